# Draws from rand() at load time (as a module that seeds itself would) and
# on every request: what each worker draws.
use strict;
use warnings;
my $at_load = rand();
sub { [200, ['Content-Type' => 'text/plain'], ["pid=$$ rand=" . int(rand() * 1e12) . "\n"]] };
