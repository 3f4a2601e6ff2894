package ForkServer::Base::Request;
use strict;
use warnings;

use Fcntl qw(S_ISSOCK S_ISDIR);
use POSIX ();
use IO::Handle ();
use Socket qw(SOL_SOCKET SCM_RIGHTS MSG_DONTWAIT);
use Socket::MsgHdr ();
use ForkServer::Link ();
use ForkServer::Protocol qw(decode_header decode_packet decode_array encode_packet encode_dict :packet :mask MODIFIER1_FORK_SERVER);

=head1 NAME

ForkServer::Base::Request - one adoption request being read by the fork server

=head1 SYNOPSIS

  my $req = ForkServer::Base::Request->new(sock => $client, deadline => $t, peer => "pid 12 uid 0", peer_pid => 12);
  # whenever $client is readable:
  my $state = eval { $req->read_some };   # 'more', 'complete' or 'gone' (closed unsent); dies: refuse
  $req->close_all unless $state;           # every descriptor the client brought
  my ($pipe_fd, $config_fd, $ondemand_fd, $cgroup_fd) = $req->fds_by_role;
  my @argv = $req->argv;

=head1 DESCRIPTION

Reads a request (PROTOCOL.md section 2) from a non-blocking socket without
ever blocking, so the fork server can serve many clients at once. The
descriptors come with the first bytes; every descriptor received is
recorded at once, so that a refusal can close all of them.

Validation: modifier1 35; mask bits only 0x01 (required), 0x02, 0x04,
0x08; the number of descriptors equal to the bits set, each a socket but
the cgroup's (0x08), a directory; the body exactly as long as
announced; a well-formed array of 1 to MAX_ARGS items, each at most
MAX_ARG_BYTES of valid UTF-8 without NUL.

=cut

use constant MSG_CTRUNC       => 0x08;          # Linux: control data did not fit
use constant FIRST_READ       => 4096;          # an adoption request is a few hundred bytes
use constant CONTROL_LEN      => 512;           # room for far more than 3 descriptors: excess ones are seen (and closed), not dropped
use constant MAX_ARGS         => 256;
use constant MAX_ARG_BYTES    => 4096;

sub new {
    my ($class, %args) = @_;
    return bless {
        sock     => $args{sock},
        peer     => $args{peer} // 'unknown peer',
        peer_pid => $args{peer_pid},
        deadline => $args{deadline},
        buf      => '',
        fds      => [],
        reads    => 0,
    }, $class;
}

sub sock     { $_[0]{sock} }
sub peer     { $_[0]{peer} }
sub peer_pid { $_[0]{peer_pid} }    # SO_PEERCRED pid of the requester, or undef
sub deadline { $_[0]{deadline} }
sub mask     { $_[0]{mask} }
sub argv     { @{ $_[0]{argv} } }
sub fds      { @{ $_[0]{fds} } }

# Reads what is there. Returns 'more' or 'complete'; dies with the reason
# for refusing the request.
# One message header for every read of the process (the base's): each new
# one was a blessed hash, and a 64 KB buffer zeroed and copied, on pages the
# base shares with every vassal, for a request of a few hundred bytes.
my $HDR;

sub read_some {
    my ($self) = @_;
    # the rest of the packet and one byte more, so trailing garbage is seen;
    # before its size is known, what a usual request takes
    my $len  = length $self->{buf};
    my $room = $len >= HEADER_SIZE ? HEADER_SIZE + (decode_header(substr $self->{buf}, 0, HEADER_SIZE))[1] + 1 - $len
             : FIRST_READ;
    my $max  = HEADER_SIZE + MAX_BODY + 1 - $len;
    $room = $max if $room > $max;
    my $hdr = $HDR //= Socket::MsgHdr->new;
    $hdr->buflen($room);
    $hdr->controllen(CONTROL_LEN);
    $hdr->flags(0);
    my $n    = Socket::MsgHdr::recvmsg($self->{sock}, $hdr, ForkServer::Link::MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (!defined $n) {
        return 'more' if $!{EAGAIN} || $!{EWOULDBLOCK} || $!{EINTR};
        die "reading request: $!\n";
    }
    my $got_fds = $self->_take_descriptors($hdr);
    die "control data truncated: too many descriptors\n" if $hdr->flags & MSG_CTRUNC;
    my $first = $self->{reads}++ == 0;
    die "descriptors arrived after the first bytes of the request\n" if $got_fds && !$first;
    # closed before its first byte: a probe that the socket accepts, not a request
    return 'gone' if $n == 0 && $first && !$got_fds;
    die "connection closed after " . length($self->{buf}) . " bytes of the request\n" if $n == 0;
    die "no descriptors with the first bytes (the Emperor pipe is required)\n" if $first && !$got_fds;
    $self->{buf} .= $hdr->buf;
    return $self->_check;
}

sub _take_descriptors {
    my ($self, $hdr) = @_;
    my @cmsg = $hdr->cmsghdr;
    my $count = 0;
    while (my ($level, $type, $data) = splice @cmsg, 0, 3) {
        next unless $level == SOL_SOCKET && $type == SCM_RIGHTS;
        my @fds = unpack 'i*', $data;
        push @{ $self->{fds} }, @fds;
        $count += @fds;
    }
    return $count;
}

sub _check {
    my ($self) = @_;
    my $len = length $self->{buf};
    my $mod1 = ord $self->{buf};
    die "wrong modifier1 $mod1 (expected " . MODIFIER1_FORK_SERVER . ")\n" unless $mod1 == MODIFIER1_FORK_SERVER;
    return 'more' if $len < HEADER_SIZE;
    my (undef, $size, $mask) = decode_header(substr $self->{buf}, 0, HEADER_SIZE);
    die "" . ($len - HEADER_SIZE - $size) . " bytes of trailing garbage after the $size-byte body\n"
        if $len > HEADER_SIZE + $size;
    return 'more' if $len < HEADER_SIZE + $size;
    $self->_validate($mask, substr $self->{buf}, HEADER_SIZE);
    return 'complete';
}

# The file type and mode of a descriptor, or undef. stat of its
# /proc/self/fd link (the open file itself, whatever its path now) rather
# than POSIX::fstat, which opens a Perl handle on a duplicate of it (a glob
# and an IO object made and freed, three system calls) for each descriptor
# of each request; POSIX::fstat where /proc is not there.
sub _fd_mode {
    my ($fd) = @_;
    my @st = stat "/proc/self/fd/$fd";
    @st = POSIX::fstat($fd) unless @st || -d '/proc/self/fd';
    return @st ? $st[2] : undef;
}

sub _validate {
    my ($self, $mask, $body) = @_;
    die sprintf("unknown mask bits 0x%02x\n", $mask) if $mask & ~(MASK_PIPE | MASK_CONFIG | MASK_ON_DEMAND | MASK_CGROUP);
    die sprintf("mask 0x%02x lacks bit 0x01 (the Emperor pipe)\n", $mask) unless $mask & MASK_PIPE;
    my $want = grep { $mask & $_ } MASK_PIPE, MASK_CONFIG, MASK_ON_DEMAND, MASK_CGROUP;
    my $have = @{ $self->{fds} };
    die sprintf("mask 0x%02x announces %d descriptors, got %d\n", $mask, $want, $have) unless $want == $have;
    my @sockets = @{ $self->{fds} };
    my $cgroup = $mask & MASK_CGROUP ? pop @sockets : undef;    # the last, in protocol order
    for my $fd (@sockets) {
        my $mode = _fd_mode($fd);
        die "received descriptor $fd is not a socket\n" unless defined $mode && S_ISSOCK($mode);
    }
    if (defined $cgroup) {
        my $mode = _fd_mode($cgroup);
        die "received descriptor $cgroup (mask 0x08) is not a directory\n" unless defined $mode && S_ISDIR($mode);
    }
    my @argv = eval { decode_array($body) };
    die "argv: $@" if $@;
    die "empty argv\n" unless @argv;
    die "argv has " . @argv . " items (max " . MAX_ARGS . ")\n" if @argv > MAX_ARGS;
    for my $i (0 .. $#argv) {
        die "argv[$i] is " . length($argv[$i]) . " bytes (max " . MAX_ARG_BYTES . ")\n" if length $argv[$i] > MAX_ARG_BYTES;
        die "argv[$i] contains a NUL byte\n" if index($argv[$i], "\0") >= 0;
        my $copy = $argv[$i];
        die "argv[$i] is not valid UTF-8\n" unless utf8::decode($copy);
    }
    $self->{mask} = $mask;
    $self->{argv} = \@argv;
    return;
}

# The received descriptors in protocol order: Emperor pipe, config pipe
# (mask 0x02), on-demand socket (mask 0x04), the vassal's cgroup directory
# (mask 0x08); undef for those not sent.
sub fds_by_role {
    my ($self) = @_;
    my @fds = @{ $self->{fds} };
    my $pipe     = shift @fds;
    my $config   = $self->{mask} & MASK_CONFIG   ? shift @fds : undef;
    my $ondemand = $self->{mask} & MASK_ON_DEMAND ? shift @fds : undef;
    my $cgroup   = $self->{mask} & MASK_CGROUP    ? shift @fds : undef;
    return ($pipe, $config, $ondemand, $cgroup);
}

=head2 cgroup_fd() -> $fd or undef

The directory of the cgroup the requester wants the vassal born in (mask
0x08), if it sent one: only our Emperor does, to our base.

=cut

sub cgroup_fd { ($_[0]->fds_by_role)[3] }

=head2 without_cgroup() -> ($mask, @fds)

The request's mask and descriptors as for a process that exists already (a
warm spare): it cannot be born anywhere, the cgroup's directory stays here.

=cut

sub without_cgroup {
    my ($self) = @_;
    my @fds = @{ $self->{fds} };
    pop @fds if $self->{mask} & MASK_CGROUP;
    return ($self->{mask} & ~MASK_CGROUP, @fds);
}

=head2 handed_over(sock => $client, data => $packet, fds => \@fds) -> $request

A request the base read and passed on whole (to a warm spare,
L<ForkServer::Spares>): checked again as if read from C<sock>, the
requester's connection, where the reply goes. Dies with the reason.

=cut

sub handed_over {
    my ($class, %args) = @_;
    my $self = $class->new(sock => $args{sock}, peer => 'the base');
    $self->{fds} = [@{ $args{fds} }];
    $self->{buf} = $args{data};
    my $state = $self->_check;
    die "an incomplete request\n" unless $state eq 'complete';
    return $self;
}

=head2 from_base(data => $packet, fds => \@fds) -> $request

A request the base checked and sent on a link only the base holds (a warm
spare's worker, L<ForkServer::Spares::WorkerStart>): decoded, its
descriptors counted against its mask, not checked again on the first
request's path (the spare checks it with C<handed_over> before it sets
itself up). Dies with the reason.

=cut

sub from_base {
    my ($class, %args) = @_;
    my $self = $class->new(sock => undef, peer => 'the base');
    $self->{fds} = [@{ $args{fds} }];
    my ($mod1, $mask, $body) = decode_packet($args{data});
    die "wrong modifier1 $mod1\n" unless $mod1 == MODIFIER1_FORK_SERVER;
    my $want = grep { $mask & $_ } MASK_PIPE, MASK_CONFIG, MASK_ON_DEMAND, MASK_CGROUP;
    die sprintf("mask 0x%02x announces %d descriptors, got %d\n", $mask, $want, scalar @{ $self->{fds} })
        unless $mask & MASK_PIPE && $want == @{ $self->{fds} };
    $self->{mask} = $mask;
    $self->{argv} = [decode_array($body)];
    return $self;
}

=head2 reply_pid($pid, $placed)

Sends the reply C<{"pid": $pid}> on the requester's connection (blocking:
a few dozen bytes into a fresh socket's buffer never wait), with
C<"cgroup": "1"> when C<$placed>: the vassal was born in the cgroup the
request named, nobody has to move it. Dies if it could not be sent (the
requester is gone).

=cut

sub reply_pid {
    my ($self, $pid, $placed) = @_;
    my $sock = $self->{sock};
    IO::Handle::blocking($sock, 1);
    my $reply = encode_packet(MODIFIER1_FORK_SERVER, 0, encode_dict(pid => $pid, ($placed ? (cgroup => 1) : ())));
    # a gone requester is an EPIPE, not a death; the base ignores SIGPIPE
    # already, and a local one costs it two sigactions (three system calls
    # each) and writes to %SIG's pages on every adoption
    local $SIG{PIPE} = 'IGNORE' unless ($SIG{PIPE} // '') eq 'IGNORE';
    my $n = syswrite($sock, $reply);
    die "sending the pid reply: $!\n" unless defined $n && $n == length $reply;
    return;
}

# Forgets the descriptors without closing them (they now belong to the
# adopted vassal).
sub release_fds { $_[0]{fds} = [] }

# Closes the connection and every descriptor the client brought.
sub close_all {
    my ($self) = @_;
    POSIX::close($_) for @{ $self->{fds} };
    $self->{fds} = [];
    close $self->{sock} if $self->{sock};
    $self->{sock} = undef;
    return;
}

1;
