package DataOwner;
use strict;
use warnings;
use Test::More tests => 2;
# __DATA__ belongs to the package current at the token
my @lines = <DataOwner::DATA>;
is_deeply \@lines, ["owned\n"], 'DataOwner::DATA has the data';
ok !exists $main::{DATA}, 'main has no DATA';
__DATA__
owned
