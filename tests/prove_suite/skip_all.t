use strict;
use warnings;
use Test::More skip_all => 'nothing to do here';
