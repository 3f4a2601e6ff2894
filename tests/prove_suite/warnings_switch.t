#!perl -w
use Test::More tests => 1;
ok $^W, '-w on the shebang line sets $^W';
