use strict;
use warnings;
use lib "tests/prove_suite/lib";
# %ENV changed above `use` of a preloaded module, but nothing preloaded reads
# it as it compiles: at run time (after every `use`, under perl too), or a
# variable only the harness's own code reads (PLACK_ENV). Runs forked.
BEGIN { $ENV{PLACK_ENV} = 'from-the-test' }
$ENV{ENV_AT_LOAD_MODE} = 'at-run-time';
use EnvAtLoad;
use Test::More tests => 2;
is $EnvAtLoad::MODE, 'default', 'the module compiled before the run-time assignment';
is $ENV{PLACK_ENV}, 'from-the-test', 'the BEGIN block ran';
