# An app that, as it loads, writes byte 22 to every descriptor it has: on
# its Emperor pipe that is uWSGI's "stop me" (a `master = false` process:
# "replace me"), said by an app rather than by its server.
use strict;
use warnings;
use POSIX ();

POSIX::write($_, chr(22), 1) for 3 .. 64;
sub { [200, ['Content-Type' => 'text/plain'], ["name=done pid=$$\n"]] };
