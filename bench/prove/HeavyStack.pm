package HeavyStack;
# What each benchmark test file loads: the same stack as bench/heavy.psgi.
use strict;
use warnings;
use Moose ();
use DBIx::Class ();
use Catalyst ();
use Mojolicious ();
use Dancer2 ();
use DateTime;
use DateTime::TimeZone;
use Template;
use JSON::XS ();
1;
