use strict;
use warnings;
use Test::More tests => 2;
# the formatter prove's tests get: Test::Builder::Formatter, which has todo_output
isa_ok Test2::API::test2_stack()->top->format, 'Test::Builder::Formatter';
ok defined Test::More->builder->todo_output, 'todo_output is there';
