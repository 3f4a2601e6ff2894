package ForkServer::Process::Random;
use strict;
use warnings;

use Config ();
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
birth: C<srand> with 32 bits from C<getrandom(2)> (or F</dev/urandom>
where the call is not known), or, where neither can be read, from the time, the pid and the previous state.

=cut

# getrandom(2): one system call where /dev/urandom costs six (open,
# the PerlIO layer's probes, read, close) in every process forked
my %GETRANDOM = ('x86_64-linux' => 318, 'aarch64-linux' => 278);
my $GETRANDOM = do {
    my ($arch) = ($Config::Config{archname} // '') =~ /\A([^-]+-linux)/;
    $arch ? $GETRANDOM{$arch} : undef;
};

sub reseed {
    my $seed;
    my $bytes = "\0" x 4;    # syscall() writes into the string's buffer
    if (defined $GETRANDOM && syscall($GETRANDOM, $bytes, 4, 0) == 4) {
        $seed = unpack 'L', $bytes;
    }
    elsif (sysopen my $fh, '/dev/urandom', POSIX::O_RDONLY()) {
        my $got = sysread $fh, $bytes, 4;
        $seed = unpack 'L', $bytes if ($got // 0) == 4;
        close $fh;
    }
    $seed //= (int(rand(2**32)) ^ ($$ << 16) ^ int(Time::HiRes::time() * 1e6)) & 0xffffffff;
    srand($seed);
    return;
}

1;
