package SuiteData;
# A module with a __DATA__ section that tests read: preloaded by
# tests/test_prove.py, so every forked test must get its own DATA handle.
use strict;
use warnings;
sub lines { my @lines = <DATA>; chomp @lines; return @lines }
1;
__DATA__
alpha
beta
