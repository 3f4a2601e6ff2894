use strict;
use warnings;
use lib "tests/prove_suite/lib";
use Test::More tests => 2;
# %ENV set before a preloaded module is loaded by use_ok in a BEGIN block
# (as JSON's t/00_load_backport_pp.t picks its backend): it must see it
BEGIN { $ENV{ENV_AT_LOAD_MODE} = 'from-the-test' }
BEGIN { use_ok('EnvAtLoad') }
is $EnvAtLoad::MODE, 'from-the-test', 'the module read %ENV as the test set it';
