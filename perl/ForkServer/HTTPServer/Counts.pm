package ForkServer::HTTPServer::Counts;
use strict;
use warnings;

use Fcntl ();
use ForkServer::HTTPServer::Desk ();

# Requests served, for the Emperor's status (docs/CONTRACT.md): the master
# creates $PSGI_FORKSERVER_RUN_DIR/requests-PID (its own pid, the one the
# Emperor knows), in which each worker has one 16-byte slot, two
# little-endian u64: requests served, their latency summed in microseconds.
# A worker writes its slot once per round of its loop (before select: one
# write for all the requests of the round, and never a count left behind
# when it goes idle), but not to that file: to a memory file (memfd) its
# master shares with its workers, which the master copies to the file
# once per turn of its own loop (at least once a second). A write to a
# file on a disk waits for the file system's journal when someone else
# keeps it busy, 30 to 200 ms at times on a shared machine: a free worker
# waiting there takes nothing from a busy sibling and serves nothing of
# its own meanwhile. A respawned worker goes on from its slot's numbers,
# and a reload's new generation uses the other half (the old one may still
# be finishing its requests). The Emperor sums the slots. Without the
# variable (not under our Emperor) nothing is written; without memfd the
# workers write the file themselves.
use constant REQUESTS_SLOT => 16;

# The workers' slots in memory (a memfd, close-on-exec), made before the
# workers are forked; undef where the system has none.
sub requests_memory { return ForkServer::HTTPServer::Desk::memory_file('psgi-forkserver-requests') }

# A vassal about to drop root makes the file first and keeps it open (the
# server's requests_fh): as its new uid it can create nothing in the run
# directory (root's), nor reach it at all when it is 0700, and the status
# showed no counts for it. Its processes reopen it through /proc/self/fd (each its
# own offset), which needs no path; the file is made the new uid's.
# A function: no server object exists yet.
sub make_requests_file {
    my ($master, $uid, $gid) = @_;
    my $dir = $ENV{PSGI_FORKSERVER_RUN_DIR};
    return undef unless defined $dir && length $dir && -d $dir;
    # opened as root, then given away: never through a link someone put there
    sysopen(my $fh, "$dir/requests-$master",
            Fcntl::O_RDWR() | Fcntl::O_CREAT() | Fcntl::O_TRUNC() | Fcntl::O_NOFOLLOW(), 0600)
        or return undef;
    chown $uid // -1, $gid // -1, $fh;
    return $fh;
}

sub _open_requests_file {
    my ($self, %o) = @_;
    if (my $fh = $self->{requests_fh}) {
        $self->{requests_file} = '/proc/self/fd/' . fileno $fh;
        return;
    }
    my $dir = $ENV{PSGI_FORKSERVER_RUN_DIR};
    return unless defined $dir && length $dir && -d $dir;
    my $path = "$dir/requests-" . ($o{master} // $$);
    # A spare's first worker may open it first (and count) before its
    # master gets here: then neither truncates.
    sysopen(my $fh, $path, Fcntl::O_WRONLY() | Fcntl::O_CREAT() | ($o{shared} ? 0 : Fcntl::O_TRUNC()), 0600)
        or return;
    close $fh;
    $self->{requests_file} = $path;
}

sub _open_requests_slot {
    my ($self, $slot) = @_;
    my $path = $self->{requests_file} or return;
    # its own file description (its own offset) of the shared memory, or
    # of the file where there is none
    $path = '/proc/self/fd/' . fileno $self->{requests_mem} if $self->{requests_mem};
    sysopen(my $fh, $path, Fcntl::O_RDWR()) or return;
    my $index = ($self->{gen} % 2) * $self->{workers} + $slot - 1;
    my $off = $index * REQUESTS_SLOT;
    my ($n, $us) = (0, 0);
    if (sysseek($fh, $off, 0) && (sysread($fh, my $rec, REQUESTS_SLOT) // 0) == REQUESTS_SLOT) {
        ($n, $us) = unpack 'Q<Q<', $rec;
    }
    $self->{requests_slot} = { fh => $fh, off => $off, n => $n, us => $us };
}

sub _count_request {
    my ($self, $seconds) = @_;
    my $r = $self->{requests_slot};
    $r->{n}++;
    $r->{us} += int($seconds * 1e6 + 0.5);
    $self->{requests_dirty} = 1;
}

# The master: the workers' slots, from memory to the file, when they
# changed since the last copy.
sub _copy_requests {
    my $self = shift;
    my $mem = $self->{requests_mem} or return;
    my $path = $self->{requests_file} or return;
    sysseek($mem, 0, 0) or return;
    defined(sysread($mem, my $slots, 65536)) or return;
    return if $slots eq ($self->{requests_copied} // '');
    # opened for each copy: the master holds no descriptor of it between
    sysopen(my $out, $path, Fcntl::O_WRONLY()) or return;
    $self->{requests_copied} = $slots if syswrite($out, $slots);
    close $out;
    return;
}

sub _flush_requests {
    my $self = shift;
    my $r = $self->{requests_slot};
    $self->{requests_dirty} = 0;
    sysseek($r->{fh}, $r->{off}, 0) and syswrite($r->{fh}, pack('Q<Q<', $r->{n}, $r->{us}));
}

1;

__END__

=head1 NAME

ForkServer::HTTPServer::Counts - requests served by L<ForkServer::HTTPServer>'s workers, for the Emperor's status

=head1 DESCRIPTION

The methods of the server object that keep the requests file
(C<$PSGI_FORKSERVER_RUN_DIR/requests-PID>, docs/CONTRACT.md): the master
creates it, each worker owns a 16-byte slot (requests served, their latency
summed in microseconds) and writes it once per round of its loop. A vassal
that drops root makes it first, for its new uid (C<make_requests_file>).

=cut
