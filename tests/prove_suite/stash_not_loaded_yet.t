use strict;
use warnings;
use lib "tests/prove_suite/lib";
# whether a package is loaded yet, by its symbol table (as Test::Deep's
# t/notest.t looks for Test::Builder's new in it): under perl it is not
# until the test loads it, whatever the base preloaded
use Test::More tests => 2;
ok !exists ${SuiteData::}{lines}, 'SuiteData::lines is not there yet';
require SuiteData;
ok exists ${SuiteData::}{lines}, 'and is once SuiteData is required';
