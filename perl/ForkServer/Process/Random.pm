package ForkServer::Process::Random;
use strict;
use warnings;

use POSIX ();
use Time::HiRes ();

=head1 NAME

ForkServer::Process::Random - a fresh seed for Perl's rand() in every forked process

=head1 SYNOPSIS

  ForkServer::Process::Random::reseed();    # first thing after a fork, before any app code

=head1 DESCRIPTION

A forked process inherits its parent's C<rand()> state: every vassal,
spare and worker forked from one base would draw the same sequence (the
same session tokens, the same temporary names). Each calls C<reseed> at
birth: C<srand> with 32 bits from F</dev/urandom>, or, where that cannot
be read, from the time, the pid and the previous state.

=cut

sub reseed {
    my $seed;
    if (sysopen my $fh, '/dev/urandom', POSIX::O_RDONLY()) {
        my $got = sysread $fh, my $bytes, 4;
        $seed = unpack 'L', $bytes if ($got // 0) == 4;
        close $fh;
    }
    $seed //= (int(rand(2**32)) ^ ($$ << 16) ^ int(Time::HiRes::time() * 1e6)) & 0xffffffff;
    srand($seed);
    return;
}

1;
