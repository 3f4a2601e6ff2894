package LazyLearned::Used;
# Required by tests/apps/lazy_require.psgi on its first request to /.
use strict;
use warnings;
sub loaded { 'used' }
1;
