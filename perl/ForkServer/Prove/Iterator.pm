package ForkServer::Prove::Iterator;
use strict;
use warnings;

use parent 'TAP::Parser::Iterator';

use Socket ();
use TAP::Parser ();
use ForkServer::Prove::Loads ();

=head1 NAME

ForkServer::Prove::Iterator - a forked test's output, for TAP::Parser

=head1 DESCRIPTION

The test is requested from the Emperor side at construction (it starts at
once, as a process does). The Emperor side reads the test's stdout and
stderr while it runs and sends both, with the wait status, when it ends:
the one handle to select on becomes readable only then, so prove's
multiplexer takes tests in the order they finish, and a slow reader never
stalls a test. Then, when the test failed, it runs again as prove runs it
(C<cold>), and that run is its verdict.

=head2 request

  my $reply = request($socket_path, $type, $payload);    # blocks for the reply

=cut

sub _connect {
    my ($path) = @_;
    # (Socket's calls, not IO::Socket::UNIX: a tenth of prove's own start-up)
    socket(my $sock, Socket::AF_UNIX(), Socket::SOCK_STREAM(), 0) or die "socket: $!\n";
    connect($sock, Socket::pack_sockaddr_un($path)) or die "cannot connect to $path: $!\n";
    return $sock;
}

sub _send {
    my ($sock, $type, $payload) = @_;
    my $msg = $type . pack('N', length $payload) . $payload;
    while (length $msg) {
        my $n = syswrite $sock, $msg;
        die "write: $!\n" unless defined $n;
        substr($msg, 0, $n, '');
    }
    shutdown $sock, 1;
    return;
}

sub _read_all {
    my ($sock) = @_;
    my $data = '';
    while (1) {
        my $n = sysread $sock, $data, 65536, length $data;
        die "read: $!\n" unless defined $n;
        last unless $n;
    }
    return $data;
}

sub request {
    my ($path, $type, $payload) = @_;
    my $sock = _connect($path);
    _send($sock, $type, $payload);
    return _read_all($sock);
}

=head2 request_nowait

  my $sock = request_nowait($socket_path, $type, $payload);    # read the reply from $sock later

=cut

sub request_nowait {
    my ($path, $type, $payload) = @_;
    my $sock = _connect($path);
    _send($sock, $type, $payload);
    return $sock;
}

sub _initialize {
    my ($self, $args) = @_;
    $self->{$_} = $args->{$_} for qw(file cold on_cold_pass on_cold_fail loads on_loads skip_is_verdict);
    my $sock = _connect($args->{socket});
    # U: a fork of the bare base (none of the suite's modules loaded)
    _send($sock, $args->{bare} ? 'U' : 'T', "$args->{file}\0$args->{spec}");
    $self->{sock} = $sock;
    return $self;
}

sub get_select_handles {
    my $self = shift;
    return ($self->{sock});
}

sub _fetch {
    my $self  = shift;
    # the socket stays open (at its end of file) while prove's multiplexer
    # selects on it: it removes it when this iterator has no more lines
    my $reply = eval { _read_all($self->{sock}) } // '';
    my ($status, $timed_out, $out_len, $err_len, $rest) = $reply =~ /\A(-?\d+) (\d) (\d+) (\d+)\n(.*)\z/s;
    if (!defined $status) {
        my $why = "emperor prove: no reply for $self->{file}\n";
        ($status, $timed_out, $out_len, $err_len, $rest) = (255 << 8, 0, 0, length $why, $why);
    }
    my $out = substr $rest, 0, $out_len;
    my $err = substr $rest, $out_len, $err_len;
    $self->_report_loads if defined $self->{loads};
    if (!$timed_out && $self->{cold} && !$ForkServer::Prove::OURS{no_cold_retry}
        && !_passes($status, $out, $self->{skip_is_verdict})) {
        $self->{delegate} = $self->{cold}->();
        $self->{verify_cold} = 1;
        return;
    }
    print STDERR $err if length $err;
    $self->{status} = $status;
    $self->{lines}  = [split /\n/, $out, -1];
    pop @{ $self->{lines} } if @{ $self->{lines} } && $self->{lines}[-1] eq '';
    return;
}

# What the forked test wrote it had loaded (ForkServer::Prove::TestFile's
# spec item loads=FILE), to `on_loads`; the file is removed.
sub _report_loads {
    my $self = shift;
    my @keys = ForkServer::Prove::Loads::read_report($self->{loads});
    $self->{on_loads}->(@keys) if $self->{on_loads};
    return;
}

# Whether a run is a pass to keep: prove's verdict from the TAP and the
# wait status, and not a skip of the whole file (a file may skip when it
# sees a module already loaded: it is then run cold too), unless
# `$skip_is_verdict`: forked from a base that holds none of the suite's
# modules, a file skips for its own reasons (an unset variable, a missing
# optional module), as it would under prove; a second, cold run of it
# would cost a perl's start and its loading again, for the same skip.
sub _passes {
    my ($status, $out, $skip_is_verdict) = @_;
    return 0 if $status;
    # the common case without a second full parse: one plan, as many
    # top-level test lines, none failing (a second plan, from a preloaded
    # module's END block, is a failure to prove: the full parse says so)
    my $plans = () = $out =~ /^1\.\.\d+/mg;
    if ($plans == 1 && $out =~ /^1\.\.(\d+)\s*$/m) {
        my $planned = $1;
        my $run     = () = $out =~ /^(?:not )?ok\b/mg;
        return 1 if $planned && $planned == $run && $out !~ /^not ok\b/m && $out !~ /^Bail out!/m;
    }
    my $parser = TAP::Parser->new({ tap => $out });
    1 while defined $parser->next;
    return !$parser->has_problems && ($skip_is_verdict || !$parser->skip_all);
}

sub next_raw {
    my $self = shift;
    $self->_fetch unless $self->{lines} || $self->{delegate};
    if (my $cold = $self->{delegate}) {
        my $line = $cold->next_raw;
        if (defined $line) {
            $self->{cold_tap} .= "$line\n" if $self->{verify_cold};
        }
        elsif (delete $self->{verify_cold}) {
            my $hook = _passes($cold->wait, $self->{cold_tap} // '') ? 'on_cold_pass' : 'on_cold_fail';
            $self->{$hook}->() if $self->{$hook};
        }
        return $line;
    }
    return shift @{ $self->{lines} };
}

sub wait {
    my $self = shift;
    return $self->{delegate}->wait if $self->{delegate};
    return $self->{status} // 0;
}

sub exit {
    my $self = shift;
    return $self->{delegate}->exit if $self->{delegate};
    my $status = $self->{status} // 0;
    return $status >> 8;
}

1;
