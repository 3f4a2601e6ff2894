use strict;
use warnings;
use Test::More;
ok 1, 'a test';
END { print STDERR "# END block of end_done_testing.t ran\n" }
done_testing;
