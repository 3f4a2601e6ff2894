# emperor-prove: no-preload
use strict;
use warnings;
use Test::More tests => 2;
ok !$INC{'ForkServer/Prove/TestFile.pm'}, 'run cold: nothing of the base is loaded';
ok !do { no warnings 'once'; $main::PRELOADED }, 'and no preloaded file';
