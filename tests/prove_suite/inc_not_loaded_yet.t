use strict;
use warnings;
use lib "tests/prove_suite/lib";
# whether a module is loaded yet, by %INC: under perl it is not until the
# test loads it, whatever the base preloaded
use Test::More tests => 2;
ok !$INC{'SuiteData.pm'}, 'SuiteData is not loaded yet';
require SuiteData;
ok $INC{'SuiteData.pm'}, 'and is once required';
