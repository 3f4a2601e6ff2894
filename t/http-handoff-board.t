use strict;
use warnings;
use Test::More;

# The workers' shared memory (the desk, the board of the earlier hand-over)
# is made with system calls whose numbers come from h2ph's syscall.ph, which
# defines them only in the package that requires it first in a process. An
# app (or any module) that loaded it before the server, or the server's own
# second module to load it, got no numbers: the desk or the board was off,
# silently, and a worker starting a slow request kept its connections with a
# request waiting although a sibling was free.
BEGIN {
    local $SIG{__WARN__} = sub { };
    require 'syscall.ph';    # as an app might, in its own package
}
use ForkServer::HTTPServer::Handoff ();
use ForkServer::HTTPServer::Desk ();

my $pair = ForkServer::HTTPServer::Handoff::pair();
ok $pair->{desk}, 'the desk is made';
ok $pair->{counts}, 'the workers\' counts in memory are made';
my $h = ForkServer::HTTPServer::Handoff::with_board(@$pair{qw(take give desk)});
ok $h->{board}, 'the hand-over\'s board is made';
ok !ForkServer::HTTPServer::Handoff::sibling_free($h, 0, 2), 'no sibling is free yet';
ForkServer::HTTPServer::Handoff::mark($h, 1, 1);
ok ForkServer::HTTPServer::Handoff::sibling_free($h, 0, 2), 'worker 1 free: worker 0 sees it';
ok !ForkServer::HTTPServer::Handoff::sibling_free($h, 1, 2), 'but not itself';
done_testing;
