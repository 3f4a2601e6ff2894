use strict;
use warnings;
use Test::More tests => 2;
ok 1, 'before END';
END { ok 1, 'inside END' }
