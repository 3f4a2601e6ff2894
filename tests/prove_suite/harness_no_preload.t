# HARNESS-NO-PRELOAD
use strict;
use warnings;
use Test::More tests => 1;
ok !$INC{'ForkServer/Prove/TestFile.pm'}, "yath's marker: run without the preloaded base";
