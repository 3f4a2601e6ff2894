use strict;
use warnings;
use Test::More tests => 4;
like $0, qr{^tests/prove_suite/dollar0_file\.t\z}, '$0 is the path as given';
is __FILE__, $0, '__FILE__ is the path as given';
is __LINE__, 6, 'line numbers are the file\'s';
my @data = <DATA>;
is_deeply \@data, ["first\n", "second\n"], '__DATA__';
__DATA__
first
second
