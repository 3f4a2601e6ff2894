# perl closes a program file without __DATA__ or __END__ once it has read
# it: a test forked from a base must not hold its own file open either
# (a test that lists its descriptors would see one that prove never gives).
use strict;
use warnings;
use Cwd qw(abs_path);
use Test::More;

my $me = abs_path(__FILE__);
my @held = grep { (readlink("/proc/self/fd/$_") // '') eq $me }
    map { m{/(\d+)\z} ? $1 : () } glob '/proc/self/fd/*';
is "@held", '', 'no descriptor open on the test file itself';
done_testing;
