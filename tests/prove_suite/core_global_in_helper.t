use strict;
use warnings;
use lib "tests/prove_suite/lib";
# a helper module of the suite's (not preloaded) overrides CORE::GLOBAL::time
# as it loads, before `use` of a module the base preloaded (as File-Slurp's
# t/lib/FileSlurpTestOverride.pm does)
use OverrideTime;
use EnvAtLoad;
use Test::More tests => 1;
is EnvAtLoad::now(), 42, "the module's time() is the helper's override";
