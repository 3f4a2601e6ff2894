package ForkServer::Process::Descriptors;
use strict;
use warnings;

use Config ();
use POSIX ();
use Socket qw(SOL_SOCKET SO_TYPE SOCK_STREAM SOCK_DGRAM SOCK_SEQPACKET AF_UNIX AF_INET AF_INET6);

=head1 NAME

ForkServer::Process::Descriptors - close what a forked process inherited and must not hold

=head1 SYNOPSIS

  my @fds = ForkServer::Process::Descriptors::open_fds();            # this process's, sorted
  my $what = ForkServer::Process::Descriptors::describe($fd);        # "/etc/app.key", "TCP socket", "pipe"
  ForkServer::Process::Descriptors::close_all_but(0, 1, 2, @ours);   # everything else, at once, the numbers kept on /dev/null

=head1 DESCRIPTION

A process forked from the base holds, at the fork, every descriptor the
base holds, among them those the app opened while it was preloaded, as
root when the base runs as root. An adopted vassal, a spare and its warm
worker close them all but their own (L<ForkServer::Base>,
L<ForkServer::Spares>), with C<close_range(2)> where the kernel has it
(Linux 5.9; system call 436 on x86_64 and arm64), else one C<close> per
entry of F</proc/self/fd>.

=cut

# close_range's number: the same on every architecture since 5.9 (the
# generic table), but x86_64 and arm64 are the ones we know we run on.
my %CLOSE_RANGE = ('x86_64-linux' => 436, 'aarch64-linux' => 436);
my $CLOSE_RANGE = do {
    my ($arch) = ($Config::Config{archname} // '') =~ /\A([^-]+-linux)/;
    $arch ? $CLOSE_RANGE{$arch} : undef;
};

=head2 open_fds() -> @fds

This process's open descriptors, sorted (from F</proc/self/fd>).

=cut

sub open_fds {
    opendir(my $dh, '/proc/self/fd') or die "reading /proc/self/fd: $!\n";
    my $own = fileno $dh;
    my @fds = sort { $a <=> $b } grep { /\A\d+\z/ && $_ != $own } readdir $dh;
    closedir $dh;
    return @fds;
}

=head2 describe($fd) -> $text

What the descriptor is, for a log line: the file's path, C<pipe>, or the
socket's family and type (C<TCP socket>, C<UNIX stream socket>, ...).

=cut

sub describe {
    my ($fd) = @_;
    my $target = readlink("/proc/self/fd/$fd") // return 'closed';
    return 'pipe' if $target =~ /\Apipe:/;
    return $target unless $target =~ /\Asocket:/;
    open(my $fh, '+<&', $fd) or return 'socket';    # a duplicate: closing it leaves $fd alone
    my $type = unpack 'i', getsockopt($fh, SOL_SOCKET, SO_TYPE) // pack 'i', -1;
    my $name = getsockname $fh;
    my $family = defined $name && length $name >= 2 ? Socket::sockaddr_family($name) : -1;
    close $fh;
    my %family = (AF_UNIX, 'UNIX', AF_INET, 'IPv4', AF_INET6, 'IPv6');
    my %type = (SOCK_STREAM, 'stream', SOCK_DGRAM, 'datagram', SOCK_SEQPACKET, 'seqpacket');
    return ($family == AF_INET || $family == AF_INET6) && $type == SOCK_STREAM ? "TCP socket ($family{$family})"
         : ($family == AF_INET || $family == AF_INET6) && $type == SOCK_DGRAM  ? "UDP socket ($family{$family})"
         : join(' ', grep { defined } $family{$family}, $type{$type}, 'socket');
}

=head2 close_all_but(@keep)

Closes every descriptor of this process but C<@keep>, then points each
number that was open at F</dev/null>: the app's Perl handles on them stay
(a handle opened while preloaded is an object of the app's), and a stale
handle's number must not be given to the next file or socket opened, which
the app would then read, write or close through it. Returns the numbers
closed.

=cut

sub close_all_but {
    my (@keep) = @_;
    my %keep = map { $_ => 1 } grep { defined } @keep;
    my @closed = grep { !$keep{$_} } open_fds();
    return () unless @closed;
    if (!_close_range(sort { $a <=> $b } keys %keep)) {
        POSIX::close($_) for @closed;
    }
    my $null = POSIX::open('/dev/null', POSIX::O_RDWR()) // die "opening /dev/null: $!\n";
    for my $fd (@closed) {
        next if $fd == $null;
        POSIX::dup2($null, $fd) // die "dup2 of /dev/null to descriptor $fd: $!\n";
    }
    POSIX::close($null) unless grep { $_ == $null } @closed;
    return @closed;
}

# close_range() over every gap between the kept descriptors; false where
# the kernel (or this module) does not know the call.
sub _close_range {
    my (@keep_sorted) = @_;
    return 0 unless defined $CLOSE_RANGE;
    my $from = 0;
    for my $k (@keep_sorted, 2**31) {    # the last range reaches past any descriptor
        if ($k > $from) {
            return 0 unless syscall($CLOSE_RANGE, $from, $k - 1, 0) == 0;
        }
        $from = $k + 1;
    }
    return 1;
}

1;
