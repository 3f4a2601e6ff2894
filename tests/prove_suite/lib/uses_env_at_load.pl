# run by env_then_require_file.t
use strict;
use warnings;
use lib "tests/prove_suite/lib";
use EnvAtLoad;
use Test::More;
# (a BEGIN block below the `use`, as DBI's t/07kids.t plans in one)
BEGIN { plan tests => 1 }
is $EnvAtLoad::MODE, 'set-before-the-require', 'the module read %ENV as the test set it before the require';
1;
