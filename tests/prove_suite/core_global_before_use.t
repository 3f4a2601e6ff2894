use strict;
use warnings;
use lib "tests/prove_suite/lib";
# CORE::GLOBAL::time overridden before `use` of a module the base has preloaded
BEGIN { no warnings 'once'; *CORE::GLOBAL::time = sub () { 42 } }
use EnvAtLoad;
use Test::More tests => 1;
is EnvAtLoad::now(), 42, "the module's time() is the override";
