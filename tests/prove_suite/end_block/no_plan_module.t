use strict;
use warnings;
use Test::More;

# does not load PlanAtEnd: under prove, its END block is not there
ok 1, 'one test, planned by done_testing';
done_testing;
