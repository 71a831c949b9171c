"""The only code of minipacs that touches pynetdicom's internals.

pynetdicom's public API (the AE, events and their handlers, statuses, SOP classes) is all
that the rest of scp/ uses; what minipacs needs below it lives here: :mod:`.reactor`
(wake-ups, spooling), :mod:`.guards` (hostile peers), :mod:`.sockets` (socket options, the
workers' shared listeners), :mod:`.responses` (packed C-FIND responses), :mod:`.contexts`
(cheap context copies), :mod:`.retrieve` (what C-GET and C-MOVE need), :mod:`.acse`
(rejecting a request). :mod:`.versions` is their one version gate.
"""
