# make run   installs what is missing and runs the example fleet
# make test  installs what is missing and runs every test
# make bench / bench-quick  benchmarks (see bench/README.md)

VENV        ?= .venv
PYTHON      ?= python3
VPY         := $(VENV)/bin/python
STAMPS      := .make

# Perl runtime, real peers for tests and benchmarks, and the Perl modules the
# example and benchmark apps load.
DEB_PACKAGES := perl libplack-perl libsocket-msghdr-perl libhttp-parser-xs-perl \
	starman uwsgi-core uwsgi-plugin-psgi wrk nginx curl procps iproute2 \
	libmoose-perl libdatetime-perl libdatetime-timezone-perl libtemplate-perl \
	libjson-xs-perl libdbix-class-perl libmojolicious-perl libdancer2-perl \
	libcatalyst-perl libtry-tiny-perl libhttp-message-perl libtest-tcp-perl \
	libgoto-file-perl libtest2-harness-perl libtap-harness-archive-perl
# The status page's browser test (tests/test_cockpit.py) and its screenshot:
# a stamp of its own, so that `make setup` for running a fleet does not pull
# a browser in; `make test` does.
BROWSER_PACKAGES := chromium fonts-dejavu-core

# What bench/run.py's `plack` row needs besides: Plack's own test suite's
# dependencies (Debian's build-depends of libplack-perl) and dpkg-source.
BENCH_DEB_PACKAGES := dpkg-dev libapache-logformat-compiler-perl libauthen-simple-passwd-perl \
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

.PHONY: all setup run test test-python test-perl bench bench-quick bench-setup clean

all: setup

setup: $(STAMPS)/debian $(STAMPS)/venv

$(STAMPS)/debian: Makefile tools/install-debian-packages
	tools/install-debian-packages $(DEB_PACKAGES)
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/venv: pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	@mkdir -p $(STAMPS) && touch $@

run: setup
	$(VENV)/bin/emperor run examples/vassals --http 127.0.0.1:8080 --status-http 127.0.0.1:9100

$(STAMPS)/browser: Makefile tools/install-debian-packages
	tools/install-debian-packages $(BROWSER_PACKAGES)
	@mkdir -p $(STAMPS) && touch $@

test: setup $(STAMPS)/browser
	$(MAKE) --no-print-directory test-perl test-python

# The Perl tests twice: under prove, and under `emperor prove` (forked
# from a preloaded base), which must give the same verdicts.
test-perl: setup
	prove -r -I perl t/
	$(VENV)/bin/emperor prove -j2 -r -I perl t/

test-python: setup $(STAMPS)/browser
	$(VPY) -m pytest -q

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
