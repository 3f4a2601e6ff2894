#!perl -T
use strict;
use warnings;
use Test::More tests => 1;
ok ${^TAINT}, 'taint mode (a -T shebang runs cold)';
