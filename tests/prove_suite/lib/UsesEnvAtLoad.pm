package UsesEnvAtLoad;
# A helper module of the suite's: it loads a module the base preloads.
use strict;
use warnings;
use EnvAtLoad;
1;
