use strict;
use warnings;
use Test::More;
# Test::More was preloaded by the base: its state must be this file's.
is(Test::More->builder->current_test, 0, 'no test counted before this one');
ok !Test::More->builder->has_plan, 'no plan yet';
done_testing;
