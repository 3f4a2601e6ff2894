use strict;
use warnings;
use Test::More tests => 2;
use FindBin;
use Cwd ();
is $FindBin::Bin, Cwd::abs_path('tests/prove_suite'), 'FindBin::Bin is this file\'s directory';
is $FindBin::Script, 'findbin.t', 'FindBin::Script';
