use strict;
use warnings;
# whether a module is loaded yet, for one that the harness's own code
# loads (IO::Socket::UNIX: the fork server's): under perl it is not
use Test::More tests => 1;
ok !$INC{'IO/Socket/UNIX.pm'}, 'IO::Socket::UNIX is not loaded';
