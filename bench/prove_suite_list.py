"""The distributions bench/prove_suites.py runs, and how each runs its tests."""

# name -> Debian source package (unpacked as PACKAGE-VERSION/)
SUITES = {
    "Moo": "libmoo-perl",
    "Role-Tiny": "librole-tiny-perl",
    "Try-Tiny": "libtry-tiny-perl",
    "Type-Tiny": "libtype-tiny-perl",
    "URI": "liburi-perl",
    "HTTP-Message": "libhttp-message-perl",
    "Path-Tiny": "libpath-tiny-perl",
    "Plack": "libplack-perl",
    "Mojolicious": "libmojolicious-perl",
    "Dancer2": "libdancer2-perl",
    "Catalyst-Runtime": "libcatalyst-perl",
    "DBIx-Class": "libdbix-class-perl",
    "Moose": "libmoose-perl",
    "Template-Toolkit": "libtemplate-perl",
    "DateTime": "libdatetime-perl",
    "Test-Deep": "libtest-deep-perl",
    "HTML-Parser": "libhtml-parser-perl",
    "Test-Simple": "libtest-simple-perl",  # Test::More's and Test2's own suite
    "Test-Warnings": "libtest-warnings-perl",
    "Sub-Quote": "libsub-quote-perl",
    "File-Slurp": "libfile-slurp-perl",
    "JSON": "libjson-perl",
    "Module-Runtime": "libmodule-runtime-perl",
    "Class-Method-Modifiers": "libclass-method-modifiers-perl",
    "namespace-clean": "libnamespace-clean-perl",
    "libwww-perl": "libwww-perl",
    "AnyEvent": "libanyevent-perl",
    "Cpanel-JSON-XS": "libcpanel-json-xs-perl",
    "YAML-Tiny": "libyaml-tiny-perl",
    "Test-Exception": "libtest-exception-perl",
    "Sub-Exporter": "libsub-exporter-perl",
    "Capture-Tiny": "libcapture-tiny-perl",  # forks and tees: minutes under prove
    "Test-Fatal": "libtest-fatal-perl",
    "Text-CSV": "libtext-csv-perl",  # its pure-Perl parser: 52,377 tests
    "Params-Validate": "libparams-validate-perl",  # XS beside a pure-Perl fallback; taint tests
    "Devel-StackTrace": "libdevel-stacktrace-perl",
    "Log-Log4perl": "liblog-log4perl-perl",
    "DBI": "libdbi-perl",  # XS; its Makefile.PL writes three more runs of t/*.t (PurePerl, Gofer, nano)
    "Params-Util": "libparams-util-perl",  # XS, and its t/pp/ and t/xs/ runs of the same tests
    "Exporter-Tiny": "libexporter-tiny-perl",
    "Getopt-Long-Descriptive": "libgetopt-long-descriptive-perl",
    "List-MoreUtils": "liblist-moreutils-perl",
    "Class-Accessor": "libclass-accessor-perl",
    "HTML-Tree": "libhtml-tree-perl",
    "Text-Template": "libtext-template-perl",
}

# prove's arguments after -j N, as each distribution's README / CI runs
# its tests: `-l -r t`, or `-b -r t` for an XS one.
PROVE_ARGS = {"Moose": ["-b", "-r", "t"], "Template-Toolkit": ["-b", "-r", "t"],
              "DateTime": ["-b", "-r", "t"], "HTML-Parser": ["-b", "-r", "t"],
              "Cpanel-JSON-XS": ["-b", "-r", "t"], "DBI": ["-b", "-r", "t"],
              "Params-Util": ["-b", "-r", "t"]}
DEFAULT_ARGS = ["-l", "-r", "t"]
# Built first (`perl Makefile.PL ARGS && make`) in a copy of their
# directory under BUILD_DIR (the unpacked suites stay as unpacked): the XS
# ones, and DBIx-Class, whose tests refuse to run without a Makefile (its
# Makefile.PL needs Module::Install from a git checkout:
# libmodule-install-perl; the author mode it then turns on, inc/.author,
# is removed, as a CPAN tarball has none).
BUILD = {"Moose": [], "Template-Toolkit": ["TT_ACCEPT=y", "TT_QUIET=y"], "DateTime": [], "HTML-Parser": [],
         "DBIx-Class": ["--skip_author_deps"], "Cpanel-JSON-XS": [], "DBI": [], "Params-Util": []}


# Where Debian's pool no longer has the source of the version Debian 12
# installs (a 404), the upstream repository's tag of that version is the same t/.
UPSTREAM = {"libdancer2-perl": "https://github.com/PerlDancer/Dancer2",
            "libcatalyst-perl": "https://github.com/perl-catalyst/catalyst-runtime",
            "libdbix-class-perl": "https://github.com/Perl5/DBIx-Class",
            "libtest-simple-perl": "https://github.com/Test-More/test-more",
            "libcapture-tiny-perl": "https://github.com/dagolden/Capture-Tiny"}
UPSTREAM_TAG = {"libcapture-tiny-perl": "release-{version}"}  # else v{version}
# Not installed as a package of its own: the version Debian 12's perl carries
# (Test::More 1.302190, in perl-modules-5.36)
CORE_VERSION = {"libtest-simple-perl": "1.302190"}
