# make run      installs the runtime and the example app's modules, runs the example fleet
# make install  a runtime install: Debian's runtime packages and a venv in $(PREFIX)
#               holding the package (no test or benchmark packages)
# make test     installs what is missing and runs every test
# make bench / bench-quick  benchmarks (see bench/README.md)
#
# Before the first command a bare Debian 12 needs only git, make and apt as
# root (or sudo); everything else, python3 and python3-venv included, is
# installed here (tools/bare-debian-check proves it on a minbase root).

VENV        ?= .venv
PYTHON      ?= python3
VPY         := $(VENV)/bin/python
STAMPS      := .make
PREFIX      ?= /opt/psgi-forkserver

# What the framework apps of tests/test_frameworks.py use (tests/apps/frameworks/).
FRAMEWORK_DEB_PACKAGES := libcatalyst-view-tt-perl libcatalyst-action-renderview-perl \
	libcatalyst-plugin-session-perl libcatalyst-plugin-session-state-cookie-perl \
	libcatalyst-plugin-session-store-fastmmap-perl libcatalyst-model-dbic-schema-perl \
	libdbd-sqlite3-perl libplack-middleware-session-perl \
	libplack-middleware-reverseproxy-perl libplack-middleware-deflater-perl

# What production runs: Python for the Emperor, the vassal program's Perl
# modules (cpanfile says the same for CPAN users), nginx for --http.
RUNTIME_DEB_PACKAGES := python3 python3-venv perl libplack-perl libsocket-msghdr-perl libfile-map-perl \
	libhttp-parser-xs-perl libhttp-message-perl nginx
# The Perl modules examples/myapp.pl (the example fleet's codebase) loads.
EXAMPLE_DEB_PACKAGES := libmoose-perl libdatetime-perl libdatetime-timezone-perl \
	libtemplate-perl libjson-xs-perl libhttp-message-perl libtry-tiny-perl
# Real peers for tests and benchmarks, tools the tests call, and the Perl
# modules the test and benchmark apps load.
DEB_PACKAGES := $(RUNTIME_DEB_PACKAGES) $(EXAMPLE_DEB_PACKAGES) \
	starman uwsgi-core uwsgi-plugin-psgi wrk curl procps iproute2 strace \
	libdbix-class-perl libmojolicious-perl libdancer2-perl \
	libcatalyst-perl libhttp-message-perl libtest-tcp-perl \
	libgoto-file-perl libtest2-harness-perl libtap-harness-archive-perl systemd \
	$(FRAMEWORK_DEB_PACKAGES)
# The status page's browser test (tests/test_cockpit.py) and its screenshot:
# a stamp of its own, so that `make setup` for running a fleet does not pull
# a browser in; `make test` does.
BROWSER_PACKAGES := chromium fonts-dejavu-core

# What bench/run.py's `plack` row needs besides: Plack's own test suite's
# dependencies (Debian's build-depends of libplack-perl) and dpkg-source;
# Module::Install for bench/prove_suites.py's DBIx-Class (its Makefile.PL).
BENCH_DEB_PACKAGES := dpkg-dev libmodule-install-perl libapache-logformat-compiler-perl libauthen-simple-passwd-perl \
	libcgi-compile-perl libcgi-emulate-psgi-perl libcgi-pm-perl \
	libcookie-baker-perl libdevel-stacktrace-ashtml-perl \
	libdevel-stacktrace-perl libfcgi-perl libfcgi-procmanager-perl \
	libfile-sharedir-perl libfilesys-notify-simple-perl \
	libhash-multivalue-perl libhttp-entity-parser-perl \
	libhttp-headers-fast-perl libhttp-message-perl \
	libhttp-request-ascgi-perl libhttp-tiny-perl libio-handle-util-perl \
	liblog-dispatch-array-perl liblog-log4perl-perl libmime-types-perl \
	libmodule-refresh-perl libstream-buffered-perl libtest-requires-perl \
	libtest-tcp-perl libtry-tiny-perl liburi-perl \
	libwww-form-urlencoded-perl libwww-perl

.PHONY: all setup install run test test-python test-perl test-perl-prove test-perl-emperor bytecode test-bytecode bench bench-quick bench-setup clean

all: setup

setup: $(STAMPS)/debian $(STAMPS)/venv

$(STAMPS)/debian: Makefile tools/install-debian-packages
	tools/install-debian-packages $(DEB_PACKAGES)
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/run-debian: Makefile tools/install-debian-packages
	tools/install-debian-packages $(RUNTIME_DEB_PACKAGES) $(EXAMPLE_DEB_PACKAGES)
	@mkdir -p $(STAMPS) && touch $@

# The development venv: the package editable, then its test extras.
$(STAMPS)/venv-run: pyproject.toml $(STAMPS)/run-debian
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e .
	@mkdir -p $(STAMPS) && touch $@

# The test venv in one pip run (the package and its test extras), not the
# runtime venv's install followed by a second one.
$(STAMPS)/venv: pyproject.toml $(STAMPS)/debian
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	@mkdir -p $(STAMPS) && touch $@

run: $(STAMPS)/run-debian $(STAMPS)/venv-run
	$(VENV)/bin/emperor run examples/vassals --http 127.0.0.1:8080 --status-http 127.0.0.1:9100

# A runtime install outside the checkout: $(PREFIX)/bin/emperor, the Perl
# side inside the package (`emperor perl-lib` prints its directory).
install:
	tools/install-debian-packages $(RUNTIME_DEB_PACKAGES)
	test -x $(PREFIX)/bin/python || $(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/python -m pip install -q --upgrade pip
	$(PREFIX)/bin/python -m pip install -q .

# After the other packages (order only): two apt-get runs at once would
# fight over dpkg's lock while the test targets' set-up runs side by side.
$(STAMPS)/browser: Makefile tools/install-debian-packages | $(STAMPS)/debian
	tools/install-debian-packages $(BROWSER_PACKAGES)
	@mkdir -p $(STAMPS) && touch $@

# The three suites run side by side (most of their time is spent waiting on
# the processes they start); --output-sync prints each one's output whole,
# when it ends, so every runner's closing lines stay together. Each waits
# only for what it needs: plain prove starts while pip fills the venv, and
# -k starts the others even when it failed first (all three always report).
test:
	$(MAKE) --no-print-directory -k -j3 --output-sync=target test-perl-prove test-perl-emperor test-python

# The Perl tests twice: under prove, and under `emperor prove` (forked
# from a preloaded base), which must give the same verdicts.
test-perl: setup
	$(MAKE) --no-print-directory -j2 --output-sync=target test-perl-prove test-perl-emperor

test-perl-prove: $(STAMPS)/debian
	prove -j3 -r -I perl t/

test-perl-emperor: setup bytecode
	$(VENV)/bin/emperor prove -j2 -r -I perl t/

# The package's bytecode, written beside it once (only what changed since):
# with PYTHONDONTWRITEBYTECODE set, every process the tests start (each
# Emperor, each `emperor` command) compiled the whole package again.
bytecode: setup
	$(VPY) -m compileall -q psgi_forkserver

# pytest's rewritten test modules, cached the same way by one collection:
# each pytest-xdist worker otherwise rewrote every test module's asserts
# (most of its collection's CPU).
test-bytecode: setup
	@mkdir -p $(STAMPS)
	PYTHONDONTWRITEBYTECODE= $(VPY) -m pytest -qq --collect-only -p no:xdist -p no:cacheprovider \
		> $(STAMPS)/collect.log || { cat $(STAMPS)/collect.log; exit 1; }

# pytest-xdist: one file per worker at a time (a file's module fixtures
# start their fleet once); tests/support/emperors.py names each worker's processes.
test-python: setup bytecode test-bytecode $(STAMPS)/browser
	$(VPY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder

bench-setup: $(STAMPS)/bench-debian

$(STAMPS)/bench-debian: Makefile tools/install-debian-packages
	tools/install-debian-packages $(BENCH_DEB_PACKAGES)
	@mkdir -p $(STAMPS) && touch $@

bench: setup bench-setup
	$(VPY) bench/run.py --full

bench-quick: setup bench-setup
	$(VPY) bench/run.py --quick

clean:
	rm -rf $(STAMPS) $(VENV) .pytest_cache .hypothesis *.egg-info
