package LazyLearned::Tenant;
# Required by tests/apps/lazy_require.psgi on /tenant, by a vassal of
# another uid: its base must never load it.
use strict;
use warnings;
sub loaded { 'tenant' }
1;
