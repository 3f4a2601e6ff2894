use strict;
use warnings;
use Test::More tests => 3;
ok 1;
ok 0, 'fails on purpose';
ok 1;
