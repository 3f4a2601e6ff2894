use strict;
use warnings;
use utf8;
use Test::More tests => 2;
# under `use utf8` perl gives __DATA__ a :utf8 layer
my $line = <DATA>;
chomp $line;
ok utf8::is_utf8($line), 'DATA decodes UTF-8';
is length $line, 4, 'four characters, not six bytes';
__DATA__
déjà
