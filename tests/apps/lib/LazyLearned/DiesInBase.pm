package LazyLearned::DiesInBase;
# Required by tests/apps/lazy_require.psgi on /dies: loads in a vassal,
# dies when a fork server (a base, by its title) loads it.
use strict;
use warnings;
die "LazyLearned::DiesInBase refuses to load in a fork server\n" if $0 =~ /\(fork server\)/;
sub loaded { 'dies-in-base' }
1;
