use strict;
use warnings;
use lib 'tests/prove_suite/lib';
use Test::More tests => 1;
use SuiteData;
is_deeply [SuiteData::lines()], [qw(alpha beta)], "a preloaded module's __DATA__, read whole";
