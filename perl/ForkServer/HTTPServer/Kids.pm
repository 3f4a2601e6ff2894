package ForkServer::HTTPServer::Kids;
use strict;
use warnings;

# The master's side of its workers: forking one (or entering a worker a
# spare forked before its master ran), the records workers send it
# (accepting, activity, busy, leaving), and reaping them with a respawn
# back-off for a crash loop.

use POSIX ();
use ForkServer::Vassal::EmperorPipe ();
use ForkServer::Process::Random ();
use ForkServer::Protocol qw(:vassal_bytes);    # the Emperor pipe's bytes
use ForkServer::HTTPServer::Listener ();
use ForkServer::HTTPServer::Wire qw(now);
use ForkServer::HTTPServer::Worker qw(:msg);

my $BLOCK_SET = POSIX::SigSet->new(map { POSIX->can("SIG$_")->() } qw(TERM INT QUIT HUP CHLD ALRM));

sub _spawn_worker {
    my ($self, $slot) = @_;
    # Signals stay blocked across fork() until the worker has its own
    # handlers: a SIGTERM sent to a newborn worker would otherwise hit the
    # master's inherited flag-setting handler and be lost.
    my $old = POSIX::SigSet->new;
    POSIX::sigprocmask(POSIX::SIG_BLOCK(), $BLOCK_SET, $old);
    my $pid = fork;
    unless (defined $pid) {
        $self->_log("fork failed: $!");
        POSIX::sigprocmask(POSIX::SIG_SETMASK(), $old);
        $self->{respawn}{$slot} = now() + 1;
        return;
    }
    if ($pid == 0) {
        ForkServer::Process::Random::reseed();
        $self->{sigmask} = $old;
        close delete $self->{stop_w};
        my $code = eval { $self->_worker_main($slot); 0 };
        unless (defined $code) { $self->_log("worker $slot: $@"); $code = 1 }
        ForkServer::HTTPServer::Worker::worker_exit($code);
    }
    POSIX::sigprocmask(POSIX::SIG_SETMASK(), $old);
    $self->{kids}{$pid} = { slot => $slot, gen => $self->{gen}, ready => 0, born => now() };
    return $pid;
}


sub run_preforked_worker {
    my ($self, %args) = @_;
    ForkServer::HTTPServer::Listener::setup($self);
    $self->{$_} = $args{$_} for qw(master_pid ready_r ready_w stop_r handoff);
    # its slot of the requests file is in the memory its spare made
    # (ForkServer::HTTPServer::Counts), which the master copies to the file
    $self->{requests_mem} = $args{handoff}{counts} if $args{handoff};
    $self->{gen} = 1;
    $self->_open_requests_file(master => $args{master_pid}, shared => 1);
    $self->{sigmask} = POSIX::SigSet->new;
    my $code = eval { $self->_worker_main($args{slot}); 0 };
    unless (defined $code) { $self->_log("worker $args{slot}: $@"); $code = 1 }
    ForkServer::HTTPServer::Worker::worker_exit($code);
}

# Records from ForkServer::HTTPServer::Worker::worker_msg; a read may end
# mid-record, the rest waits in msgbuf.
sub _read_worker_messages {
    my $self = shift;
    my $got = sysread($self->{ready_r}, $self->{msgbuf}, 16384, length($self->{msgbuf} //= ''));
    return unless $got;
    my $now = now();
    while (length $self->{msgbuf} >= 10) {
        my ($pid, $type, $len) = unpack 'NNn', $self->{msgbuf};
        last if length $self->{msgbuf} < 10 + $len;
        my $payload = substr($self->{msgbuf}, 10, $len);
        substr($self->{msgbuf}, 0, 10 + $len, '');
        if ($type == MSG_ACTIVITY) {
            $self->{last_activity} = $now;
            $self->{idle_sent} = 0;
            next;
        }
        my $k = $self->{kids}{$pid} or next;
        if ($type == MSG_ACCEPTING) {
            $self->_worker_accepting($k);
        } elsif ($type == MSG_BUSY) {
            $k->{busy_since} = $now;
            $k->{request} = $payload;
        } elsif ($type == MSG_DONE) {
            delete $k->{busy_since};
        } elsif ($type == MSG_LEAVING) {
            next if $k->{replaced} || $self->{stopping} || $k->{gen} != $self->{gen};
            $k->{replaced} = 1;
            $self->_spawn_worker($k->{slot});
        }
    }
}

sub _worker_accepting {
    my ($self, $k) = @_;
    $k->{ready} = 1;
    $self->{slot_fast_deaths}{$k->{slot}} = 0;
    unless ($self->{sent_accepting}) {
        $self->{sent_accepting} = 1;
        ForkServer::Vassal::EmperorPipe->send($self->{emperor_fh}, ACCEPTING);
    }
    return if $self->{sent_loyal} || $self->{stopping};
    my $ready = grep { $_->{ready} && $_->{gen} == $self->{gen} } values %{ $self->{kids} };
    if ($ready >= $self->{workers}) {
        $self->{sent_loyal} = 1;
        ForkServer::Vassal::EmperorPipe->send($self->{emperor_fh}, LOYAL);
    }
}

sub _reap {
    my $self = shift;
    while ((my $pid = waitpid(-1, POSIX::WNOHANG())) > 0) {
        my $status = $?;
        my $k = delete $self->{kids}{$pid} or next;   # not a worker (an app's child)
        next if $self->{stopping} || $k->{gen} != $self->{gen} || $k->{replaced};
        my $slot = $k->{slot};
        my $code = $status >> 8;
        my $intended = !($status & 127) && ($code == EXIT_RECYCLE || $code == EXIT_HARAKIRI);
        if (!$intended) {
            $self->_log(sprintf("worker %d (pid %d) died (%s), respawning", $slot, $pid,
                                ($status & 127) ? "signal " . ($status & 127) : "exit $code"));
        }
        # A worker that dies young, again and again, before it ever accepts
        # is crash-looping: back off instead of forking flat out. One that
        # died serving a request (a poisoned route) is replaced at once:
        # backing off there left a vassal with no worker at all.
        if (!$intended && !$k->{ready} && now() - $k->{born} < 1) {
            my $n = ++$self->{slot_fast_deaths}{$slot};
            if ($n >= 3) {
                my $delay = 0.1 * 2 ** ($n - 3);
                $delay = 5 if $delay > 5;
                $self->{respawn}{$slot} = now() + $delay;
                next;
            }
        } else {
            $self->{slot_fast_deaths}{$slot} = 0;
        }
        $self->_spawn_worker($slot);
    }
}

sub _reap_blocking {
    my $self = shift;
    for my $pid (keys %{ $self->{kids} }) {
        waitpid($pid, 0);
        delete $self->{kids}{$pid};
    }
}

1;

__END__

=head1 NAME

ForkServer::HTTPServer::Kids - the master of L<ForkServer::HTTPServer> and its workers

=head1 DESCRIPTION

Methods of the server object that run in the master (C<_spawn_worker>,
C<_read_worker_messages>, C<_reap>, C<_reap_blocking>), and one that runs
in a worker forked before its master:

=head2 run_preforked_worker(slot => 1, master_pid => $pid, ready_r => $fh, ready_w => $fh, stop_r => $fh)

The entry point of a worker forked before its master ran (a spare's first
worker, L<ForkServer::Spares>): the same worker as one that C<run()>
forks, given the master's pipes (the master gets them as
C<preforked =E<gt> { pid, ready_r, ready_w, stop_r, stop_w }> in C<new>).
Does not return.


=cut
