"""The configuration: defaults, config.yaml and the README stay in step; every problem is
reported at once."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from scp.config import LIST_SECTIONS, REQUIRED, SECTIONS, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def code_defaults() -> dict[str, Any]:
    out = {}
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            value = getattr(cls(), f.name)
            out[f"{name}.{f.name}"] = (str(value) if isinstance(value, Path)
                                       else list(value) if isinstance(value, tuple) else value)
    return out


def list_defaults() -> dict[str, Any]:
    """``peers[].port`` -> its default; required keys -> "(required)"; lists as YAML."""
    def shown(value: Any) -> Any:
        return f"[{', '.join(value)}]" if isinstance(value, tuple) else value
    return {f"{name}[].{f.name}": "(required)" if f.name in REQUIRED[name]
            else shown(getattr(cls(), f.name))
            for name, cls in LIST_SECTIONS.items() for f in dataclasses.fields(cls)}


def test_config_yaml_holds_every_key_with_the_code_default() -> None:
    text = (REPO / "config.yaml").read_text()
    raw = yaml.safe_load(text)
    from_yaml = {f"{section}.{key}": value for section, keys in raw.items()
                 if section not in LIST_SECTIONS for key, value in keys.items()}
    assert from_yaml == code_defaults()
    assert {name: raw[name] for name in LIST_SECTIONS} == {name: [] for name in LIST_SECTIONS}
    # the commented example entry above each list section names every key of an entry, with
    # its default
    for name, cls in LIST_SECTIONS.items():
        block = text.split(f"\n{name}: []")[0].split("\n\n")[-1]
        example = yaml.safe_load("\n".join(
            line.replace("#   ", "  ", 1).replace("# - ", "- ", 1)
            for line in block.splitlines() if line.startswith(("#   ", "# - "))))
        entry = example[0]
        assert set(entry) == {f.name for f in dataclasses.fields(cls)}, name
        for f in dataclasses.fields(cls):
            if f.name not in REQUIRED[name]:
                value = entry[f.name]
                assert (tuple(value) if isinstance(value, list) else value) == getattr(
                    cls(), f.name), f"{name}[].{f.name}"


def test_readme_documents_every_key_with_its_default() -> None:
    readme = (REPO / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_]+(?:\[\])?\.[a-z0-9_]+)` \| `?([^`|]*)`? \|", readme, re.M))
    expected = {k: str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in {**code_defaults(), **list_defaults()}.items()}
    assert rows == expected


def test_repository_config_loads_and_resolves_paths_against_its_folder() -> None:
    config = load_config(REPO / "config.yaml")
    assert config.ae.title == "MINIPACS" and config.ae.port == 11112
    assert config.storage.data_dir == REPO / "data"
    assert config.index_url == f"sqlite:///{REPO / 'data' / 'index.sqlite'}"
    assert config.files_path == REPO / "data" / "files"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "ae:\n  title: 'THIS TITLE IS FAR TOO LONG'\n  port: 70000\n  bind: nowhere\n"
        "  max_associations: 0\n  dimse_timeout: -1\n  workers: 65\n"
        "storage:\n  on_duplicate: overwrite\n  durability: maybe\n  index_url: mysql://x\n"
        "  colour: blue\n"
        "query:\n  pn_case_insensitive: 'yes'\n"
        "colours: {}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    for fragment in ("ae.title", "ae.port", "ae.bind", "ae.max_associations", "ae.dimse_timeout",
                     "ae.workers: must be between 1 and 64", "storage.on_duplicate", "storage.durability", "storage.index_url",
                     "unknown key storage.colour", "query.pn_case_insensitive",
                     "unknown section 'colours'"):
        assert any(fragment in p for p in problems), (fragment, problems)
    assert len(problems) == 12


@pytest.mark.parametrize(("text", "message"), [
    ("- a\n- b\n", "top level must be a mapping"),
    ("ae: [1, 2]\n", "ae: must be a mapping"),
    ("ae:\n  port: '11112'\n", "ae.port: must be a whole number"),
    ("ae: {title: 'A\\\\B'}\n", "ae.title: must be ASCII without backslash"),
    ("ae: {\n", "not valid YAML"),
    ("query: {response_charset: 'ISO 2022 IR 87'}\n", "query.response_charset: must be auto"),
    ("query: {response_charset: KOI8}\n", "query.response_charset: must be auto"),
])
def test_single_problems(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)


def test_relative_paths_and_sqlite_urls_resolve_against_the_config_folder(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    path = folder / "c.yaml"
    path.write_text("storage:\n  data_dir: store\n  index_url: sqlite:///db/index.sqlite\n")
    config = load_config(path)
    assert config.storage.data_dir == folder / "store"
    assert config.index_url == f"sqlite:///{folder / 'db' / 'index.sqlite'}"


def test_overrides_apply_over_the_file(tmp_path: Path) -> None:
    config = load_config(REPO / "config.yaml", {"ae.port": 4242, "ae.title": "OTHER",
                                                "storage.data_dir": str(tmp_path)})
    assert (config.ae.port, config.ae.title, config.storage.data_dir) == (4242, "OTHER", tmp_path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_override_of_a_broken_section_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("ae: [1, 2]\n")
    with pytest.raises(ConfigError, match="ae: must be a mapping"):
        load_config(path, {"ae.port": 5000})


def test_peers_are_loaded_and_looked_up_by_ae_title(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("peers:\n  - ae_title: VIEWER\n    host: 10.0.0.5\n    port: 11113\n"
                    "  - {ae_title: WS, host: ws.example.org, max_pdu_size: 65536,"
                    " transfer_syntax: 1.2.840.10008.1.2}\n")
    config = load_config(path)
    assert [p.ae_title for p in config.peers] == ["VIEWER", "WS"]
    viewer = config.peer("VIEWER  ")  # AE titles compare without trailing spaces
    assert viewer is not None and (viewer.host, viewer.port) == ("10.0.0.5", 11113)
    ws = config.peer("WS")
    assert ws is not None and (ws.port, ws.max_pdu_size, ws.transfer_syntax) == (
        104, 65536, "1.2.840.10008.1.2")
    assert config.peer("NOBODY") is None


def test_every_peer_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("peers:\n  - {host: a, port: 0}\n  - {ae_title: X, host: b, colour: red}\n"
                    "  - {ae_title: X, host: c, transfer_syntax: 1.2.840.10008.1.2.4.50,"
                    " max_pdu_size: -1, connections: 9}\n  - just a string\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    for fragment in ("peers[0].ae_title: is required", "peers[0].port: must be between 1",
                     "unknown key peers[1].colour", "peers[2].transfer_syntax: must be empty",
                     "peers[2].max_pdu_size", "peers[3]: must be a mapping",
                     "peers[2].connections: must be between 1 and 8, not 9",
                     "AE title 'X' is listed more than once"):
        assert any(fragment in p for p in problems), (fragment, problems)
    assert len(problems) == 8


def test_peers_must_be_a_list(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("peers: {ae_title: X}\n")
    with pytest.raises(ConfigError, match="peers: must be a list"):
        load_config(path)


def test_peer_network_and_services_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("peers:\n  - {ae_title: A, network: 10.0.0.0/33, services: [echo, delete]}\n"
                    "  - {ae_title: B, services: store}\n"
                    "  - {ae_title: C, network: 10.1.2.0/24, services: [find]}\n"
                    "security: {allow_unknown_peers: 'no'}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    for fragment in ("peers[0].network: must be an address or network",
                     "peers[0].services: unknown 'delete'",
                     "peers[1].services: must be a list of strings",
                     "security.allow_unknown_peers: must be true or false"):
        assert any(fragment in p for p in problems), (fragment, problems)
    assert len(problems) == 4


def assert_reported(path: Path, *fragments: str) -> None:
    """Loading ``path`` reports one problem per fragment, each containing it."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    for fragment in fragments:
        assert any(fragment in p for p in problems), (fragment, problems)
    assert len(problems) == len(fragments), problems


def test_routes_are_loaded_and_every_problem_reported(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("peers:\n  - {ae_title: AI, host: 10.0.0.9}\n  - {ae_title: WARD}\n"
                    "routes:\n  - {name: ct, match: {Modality: CT, CallingAETitle: 'CT*'},"
                    " to: ['AI ', AI], stable_seconds: 30}\n")
    config = load_config(path)  # the outbox names a peer by its title without spaces
    [route] = config.archive_options().routes
    assert (route.name, route.match, route.to, route.stable_seconds) == (
        "ct", (("Modality", "CT"), ("CallingAETitle", "CT*")), ("AI",), 30.0)
    path.write_text("peers:\n  - {ae_title: AI, host: 10.0.0.9}\n  - {ae_title: WARD}\n"
                    "routes:\n  - {match: {Modalty: CT}, to: [WARD]}\n"
                    "  - {name: a, to: [NOBODY], match: {Modality: [CT]}, stable_seconds: -1}\n"
                    "  - {name: a}\n"
                    "routing: {retry_seconds: 0, max_attempts: 0}\n")
    assert_reported(path, "routes[0].name: is required",
                    "routes[0].match: 'Modalty' is not a DICOM",
                    "routes[0].to: 'WARD' is not in peers with a host",
                    "routes[1].match: must be a mapping of strings",
                    "routes[1].stable_seconds: must not be negative",
                    "routes[1].to: 'NOBODY' is not in peers", "routes[2].to: is required",
                    "routes: name 'a' is listed more than once",
                    "routing.retry_seconds: must be a positive", "routing.max_attempts")


def test_retention_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("retention: {max_age_days: 30, protect: ['PatientID=A+B&StudyDate=20200101-',"
                    " 'ModalitiesInStudy=MG']}\n")
    rules = load_config(path).retention.rules()
    assert rules.protect == ((("PatientID", "A+B"), ("StudyDate", "20200101-")),
                             (("ModalitiesInStudy", "MG"),))  # + is kept
    path.write_text("retention: {max_age_days: 99999, max_disk_percent: 100, age_by: date,"
                    " interval_minutes: 0, protect: ['ModalityInStudy=MG', 'limit=1',"
                    " 'ModalitiesInStudy=', '']}\n")
    assert_reported(path, "retention.max_age_days: must be from 0",
                    "retention.max_disk_percent",
                    "retention.age_by: must be one of received, study_date",
                    "retention.interval_minutes", "'ModalityInStudy=MG'", "'limit=1'",
                    "'ModalitiesInStudy=': it matches every study", "'': it is empty")


def test_workers_need_the_sqlite_index(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("ae:\n  workers: 2\nstorage:\n  index_url: postgresql://pacs@db/pacs\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        "ae.workers: more than 1 needs the SQLite index (storage.index_url empty or "
        "sqlite:///...)"]
    path.write_text("ae:\n  workers: 2\nstorage:\n  index_url: sqlite:///x.sqlite\n")
    assert load_config(path).ae.workers == 2


def test_the_object_store_keys_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("storage:\n  files_url: s3://\n  s3_endpoint: 127.0.0.1:8333\n"
                    "retention:\n  max_disk_percent: 90\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [p.split(":")[0] for p in info.value.problems] == [
        "storage.s3_endpoint", "storage.files_url", "retention.max_disk_percent"]
    path.write_text("storage:\n  files_url: s3://bucket/images\n"
                    "retention:\n  max_disk_percent: 90\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [p.split(":")[0] for p in info.value.problems] == ["retention.max_disk_percent"]
    path.write_text("storage:\n  files_url: s3://bucket/images\n  s3_endpoint: "
                    "http://127.0.0.1:8333\n  s3_secret_access_key: hush\n"
                    "  data_dir: store\n")
    config = load_config(path)
    options = config.archive_options()
    assert (options.files_url, options.s3.endpoint) == ("s3://bucket/images",
                                                        "http://127.0.0.1:8333")
    assert config.files_path == tmp_path / "store" / "files"  # the node's own folder
    assert "hush" not in repr(config) and "hush" not in repr(options)
    path.write_text("storage:\n  files_url: elsewhere\n")
    config = load_config(path)
    assert (config.files_path, config.archive_options().files_url) == (
        tmp_path / "elsewhere", "")


def test_a_problem_with_a_flag_names_the_flag_not_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("ae:\n  title: ALSO_FAR_TOO_LONG_TITLE\n  port: 70000\n")
    flags = {"ae.title": "--ae-title", "ae.bind": "--bind"}
    with pytest.raises(ConfigError) as info:
        load_config(path, {"ae.title": "X" * 17, "ae.bind": "nowhere"}, flags)
    assert info.value.problems == [
        "--ae-title: must be at most 16 characters",
        "--bind: must be an IP address, not 'nowhere'",
        f"{path}: ae.port: must be between 0 and 65535, not 70000",
    ]
    assert str(info.value).startswith(f"the command line and {path} have 3 problem(s):")
    with pytest.raises(ConfigError) as info:  # only the flag is wrong
        load_config(path, {"ae.title": "X" * 17, "ae.port": 104}, flags)
    assert str(info.value) == ("the command line has 1 problem(s):\n"
                               "  - --ae-title: must be at most 16 characters")
    with pytest.raises(ConfigError) as info:  # a good flag hides the file's bad value
        load_config(path, {"ae.title": "GOOD"}, flags)
    assert str(info.value) == (f"{path} has 1 problem(s):\n"
                               "  - ae.port: must be between 0 and 65535, not 70000")


def test_web_section_problems_are_reported_with_the_others(tmp_path: Path) -> None:
    """The web section's port, bind and choices are checked as the ae section's are, and
    its own rules (base_path) after them, all at once."""
    path = tmp_path / "c.yaml"
    path.write_text("web:\n  port: 70000\n  bind: nowhere\n  anonymous_local: all\n"
                    "  base_path: dicom-web/\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        "web.anonymous_local: must be one of none, read, read-write, not 'all'",
        "web.port: must be between 0 and 65535, not 70000",
        "web.bind: must be an IP address, not 'nowhere'",
        "web.base_path: must start with / and not end with one (e.g. /dicom-web), not"
        " 'dicom-web/'",
    ]


SAMPLE_TABLE = REPO / "tests" / "storage" / "data" / "part15-sample.xml"


def test_profiles_need_the_table_and_a_secret_and_known_options(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "deidentify": {"secret": "short"},
        "profiles": [
            {"name": "a", "options": ["retain_uids", "keep_everything"]},
            {"name": "b", "options": ["retain_long_full_dates", "retain_long_modified_dates"]},
            {"name": "c", "safe_private": ["ACME/0C", "(0018,xx0C) ACME"]},
            {"name": "d", "safe_private": ["(0019,xx0C) ACME"]},
            {"name": "a"},
            {"options": []},
        ]}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    for fragment in ("deidentify.table: is required when profiles are configured",
                     "deidentify.secret: must have at least 16 characters",
                     "profiles[0].options: unknown option 'keep_everything'",
                     "profiles[1]: profile b: retain_long_full_dates and"
                     " retain_long_modified_dates exclude each other",
                     "profiles[2].safe_private: 'ACME/0C' is not (gggg,xxee) CREATOR",
                     "profiles[2].safe_private: '(0018,xx0C) ACME': 0018 is not a private",
                     "profiles[3]: profile d: safe_private needs the retain_safe_private",
                     "profiles: name 'a' is listed more than once",
                     "profiles[5].name: is required"):
        assert any(fragment in p for p in problems), (fragment, problems)
    assert len(problems) == 9, problems


def test_a_profile_reaches_storage_with_its_table_relative_to_the_config(
        tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "part15.xml").write_bytes(SAMPLE_TABLE.read_bytes())
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump({
        "deidentify": {"table": "part15.xml", "secret": "s" * 16},
        "profiles": [{"name": "research", "options": ["retain_safe_private"],
                      "safe_private": ["(0019,xx0C) SIEMENS MR HEADER"]}]}))
    config = load_config(path)
    options = config.archive_options().deidentify
    assert options is not None and options.table == folder / "part15.xml"
    assert "s" * 16 not in repr(config.deidentify)  # the secret is kept out of logs
    [profile] = options.profiles.values()
    assert profile.safe_private == frozenset({(0x0019, "SIEMENS MR HEADER", 0x0C)})
    assert load_config(REPO / "config.yaml").archive_options().deidentify is None
    (folder / "part15.xml").unlink()
    with pytest.raises(ConfigError, match="deidentify.table: .*part15.xml is not a file"):
        load_config(path)
