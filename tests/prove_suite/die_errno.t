use strict;
use warnings;
print "1..1\nok 1\n";
$! = 5;    # perl exits with $! when a die is not caught
die "dying with errno 5\n";
