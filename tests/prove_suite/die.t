use strict;
use warnings;
use Test::More;
ok 1, 'before dying';
die "dying on purpose\n";
