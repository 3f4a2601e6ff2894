use strict;
use warnings;
use Test::More tests => 2;
ok 1;
BAIL_OUT('stop the run');
