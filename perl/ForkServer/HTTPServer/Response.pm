package ForkServer::HTTPServer::Response;
use strict;
use warnings;

# Running the app for one request and writing its response (arrays in one
# write, handles and streaming writers in pieces, chunked when the length
# is unknown), harakiri around it, psgix.cleanup after it, the access log
# and the server's own error responses.

use HTTP::Status ();
use Plack::Util ();
use ForkServer::HTTPServer::Wire qw(now write_all status_line http_date log_date CRLF);
use ForkServer::HTTPServer::Worker qw(:msg);
use ForkServer::HTTPServer::Writer ();
use ForkServer::Log ();

# The request's head and body are read: run the app and answer. Returns 1
# to keep the connection, 0 to close it; dies when the client vanished.
sub _dispatch {
    my ($self, $c, $env, $keep, $t0, $close_delimited) = @_;
    # Harakiri covers exactly the app and the response, and is disarmed
    # however it ends: a response write that failed used to leave the alarm
    # running into the next request, which it then killed.
    my $harakiri = $self->{harakiri};
    my $st = { keep => $keep, close_delimited => $close_delimited,
               head => $env->{REQUEST_METHOD} eq 'HEAD', status => 0, bytes => 0, sent => 0 };
    if ($harakiri) {
        $self->{current_request} = qq{"$env->{REQUEST_METHOD} $env->{REQUEST_URI} $env->{SERVER_PROTOCOL}" from $c->{raddr}};
        alarm $harakiri;
        worker_msg($self->{ready_w}, MSG_BUSY, $self->{current_request});
    }
    my $ok = eval { $self->_run_app($c->{sock}, $env, $st); 1 };
    my $err = $@;
    if ($harakiri) { alarm 0; worker_msg($self->{ready_w}, MSG_DONE) }
    $self->_count_request(now() - $t0) if $self->{requests_slot} && ($ok || $st->{sent});
    $self->_access_log($env, $st->{status}, $st->{bytes}, $c) if $self->{access_log} && ($ok || $st->{sent});
    $self->_run_cleanup($env);
    die $err unless $ok;
    if ($env->{'psgix.harakiri.commit'}) { $self->{harakiri_commit} = 1; return 0 }
    return $st->{keep} ? 1 : 0;
}

# psgix.cleanup: the handlers run after the response is out, before the
# worker looks at its next request.
sub _run_cleanup {
    my ($self, $env) = @_;
    my $handlers = $env->{'psgix.cleanup.handlers'};
    return unless $handlers && @$handlers;
    for my $h (@$handlers) {
        eval { $h->($env); 1 } or $self->_log("cleanup handler error: $@");
    }
}

sub _run_app {
    my ($self, $conn, $env, $st) = @_;
    local $ForkServer::HTTPServer::Wire::DEADLINE = 0;
    my $res = eval { $self->{app}->($env) };
    if (!defined $res) {
        my $err = $@ || "app returned undef\n";
        $self->_log("app error: $err");
        $res = [500, ['Content-Type' => 'text/plain'], ['Internal Server Error']];
    }
    # The response has a whole deadline from its first byte.
    my $respond = sub {
        local $ForkServer::HTTPServer::Wire::DEADLINE = $st->{deadline} = now() + $self->{response_timeout};
        $self->_respond($conn, $env, $st, $_[0]);
    };
    if (ref $res eq 'ARRAY') {
        $respond->($res);
    } elsif (ref $res eq 'CODE') {
        $self->_run_delayed($res, $respond, $st);
    } else {
        $self->_log("app returned an invalid response");
        $respond->([500, ['Content-Type' => 'text/plain'], ['Internal Server Error']]);
    }
}

# A delayed response (psgi.streaming): the app calls $respond when it can.
sub _run_delayed {
    my ($self, $res, $respond, $st) = @_;
    my $ok = eval { $res->(sub { $respond->($_[0]) }); 1 };
    unless ($ok) {
        my $err = $@;
        die $err if $err =~ /^ForkServer::client-gone/;
        $self->_log("app error: $err");
        if (!$st->{sent}) {
            $respond->([500, ['Content-Type' => 'text/plain'], ['Internal Server Error']]);
        } else {
            $st->{keep} = 0;
        }
    }
    # A writer the app kept open cannot be finished later by a blocking
    # server: the response length is unknown, so close.
    $st->{keep} = 0 if !$st->{sent} || ($st->{writer} && !$st->{writer}{closed});
    unless ($st->{sent}) {
        $respond->([500, ['Content-Type' => 'text/plain'], ['No response']]);
    }
}

# Sends status line and headers, and the body if it is there; returns a
# writer for a streaming response (no body in $res).
sub _respond {
    my ($self, $conn, $env, $st, $res) = @_;
    die "ForkServer: response already sent\n" if $st->{sent}++;
    my ($status, $headers, $body) = @$res;
    $st->{status} = $status;
    my $no_entity = Plack::Util::status_with_no_entity_body($status);
    my ($out, $chunked) = $self->_response_head($env, $st, $status, $headers, $body, $no_entity);
    my $send_body = !$st->{head} && !$no_entity;

    if (ref $body eq 'ARRAY') {
        # The common case in one write(2).
        if ($send_body) {
            my $b = join '', @$body;
            $b = $st->{dechunk}->feed($b) if $st->{dechunk};
            $st->{bytes} = length $b;
            $out .= $b;
        }
        write_all($conn, $out);
        return;
    }
    write_all($conn, $out);
    if (defined $body) {
        # A file handle or an object with getline() and close().
        my $bytes = 0;
        if ($send_body) {
            my $dechunk = $st->{dechunk};
            Plack::Util::foreach($body, sub {
                my $piece = $dechunk ? $dechunk->feed($_[0]) : $_[0];
                $bytes += length $piece;
                write_all($conn, $chunked ? sprintf('%x', length $piece) . CRLF . $piece . CRLF : $piece);
            });
            write_all($conn, "0" . CRLF . CRLF) if $chunked;
        } else {
            $body->close;
        }
        $st->{bytes} = $bytes;
        return;
    }
    my $w = ForkServer::HTTPServer::Writer->_new($conn, $st, $chunked && $send_body, $send_body);
    $st->{writer} = $w;
    return $w;
}

# The status line and header block; and whether the body goes chunked.
sub _response_head {
    my ($self, $env, $st, $status, $headers, $body, $no_entity) = @_;
    my ($cl, $te);
    my $out = status_line($status);
    # By hand, not Plack::Util::header_iter: its copy of the list and a
    # closure call per header cost 1.3 us a request (10% of "hello").
    for (my $i = 0; $i < @$headers; $i += 2) {
        my ($k, $v) = @$headers[$i, $i + 1];
        if ($k =~ /^(?:content-length|transfer-encoding|connection)$/i) {
            my $lk = lc $k;
            if ($lk eq 'content-length') { $cl = $v }
            elsif ($lk eq 'transfer-encoding') {
                $te = $v;
                # the app chunks its body itself: an HTTP/1.0 client must not
                # get that encoding, nor nginx over uwsgi (it reads to the
                # close, unframing nothing); the body goes unframed
                if (($env->{SERVER_PROTOCOL} ne 'HTTP/1.1' || $st->{close_delimited})
                    && $v =~ /\Achunked\z/i) {
                    require ForkServer::HTTPServer::Dechunk;
                    $st->{dechunk} = ForkServer::HTTPServer::Dechunk->new;
                    next;
                }
            }
            else { $st->{keep} = 0 if $v =~ /\bclose\b/i; next }   # we own Connection
        }
        $out .= "$k: $v" . CRLF;
    }

    # a stop or reload began while the app ran: this is the last response
    $st->{keep} = 0 if $st->{keep} && $self->_stop_asked;
    my $chunked = 0;
    if (!$no_entity && !defined $cl && !defined $te) {
        if (ref $body eq 'ARRAY') {
            # Cheaper than chunking and keeps the connection reusable.
            $out .= "Content-Length: " . Plack::Util::content_length($body) . CRLF;
        } elsif ($env->{SERVER_PROTOCOL} eq 'HTTP/1.1' && !$st->{close_delimited}) {
            $chunked = 1;
            $out .= "Transfer-Encoding: chunked" . CRLF;
        } else {
            $st->{keep} = 0;   # HTTP/1.0: the end of the body is the close
        }
    } elsif (defined $te) {
        $st->{keep} = 0;       # the app chunks itself: we cannot tell its end
    }

    $out .= "Date: " . http_date() . CRLF;
    if (!$st->{keep}) { $out .= "Connection: close" . CRLF }
    elsif ($env->{SERVER_PROTOCOL} eq 'HTTP/1.0') { $out .= "Connection: keep-alive" . CRLF }
    return ($out . CRLF, $chunked);
}

sub write_informational {
    my ($conn, $code, $headers) = @_;
    my $msg = status_line($code);
    Plack::Util::header_iter($headers || [], sub { $msg .= "$_[0]: $_[1]" . CRLF });
    write_all($conn, $msg . CRLF);
}

# The server's own answer to a request it refuses; always closes.
sub _error_response {
    my ($self, $conn, $status, $env, $c) = @_;
    my $msg = HTTP::Status::status_message($status) // 'Error';
    my $body = "$status $msg\n";
    eval {
        write_all($conn, status_line($status)
            . "Date: " . http_date() . CRLF
            . "Content-Type: text/plain" . CRLF
            . "Content-Length: " . length($body) . CRLF
            . "Connection: close" . CRLF . CRLF . $body);
    };
    $self->_access_log($env || {}, $status, length $body, $c);
}

# Combined log format with the vassal's name first and the time taken last
# (seconds, from the request's first byte to its last response byte).
sub _access_log {
    my ($self, $env, $status, $bytes, $c) = @_;
    my $fh = $self->{access_log} or return;
    my @f = @$env{qw(REMOTE_USER REQUEST_METHOD REQUEST_URI SERVER_PROTOCOL HTTP_REFERER HTTP_USER_AGENT)};
    for (@f) {
        # A client's bytes: quotes, backslashes and control bytes escaped
        # (\xHH, as Apache does), so no client can forge or split a line.
        if (!defined || !length) { $_ = '-' }
        elsif (/[\x00-\x1f\x7f"\\]/) { s/([\x00-\x1f\x7f"\\])/sprintf('\\x%02x', ord $1)/ge }
    }
    my $line = sprintf qq{%s %s - %s [%s] "%s %s %s" %s %s "%s" "%s" %s\n},
        $self->{name}, $env->{REMOTE_ADDR} // ($c ? $c->{raddr} : undef) // '-', $f[0], log_date(),
        @f[1, 2, 3], $status, $bytes || '-', @f[4, 5],
        $c && $c->{started} ? sprintf('%.6f', now() - $c->{started}) : '-';
    # One write(2) per line so lines of concurrent workers never interleave;
    # on the descriptor, past any layer the app put on STDERR.
    ForkServer::Log::write_fd($fh, $line);
}

1;

__END__

=head1 NAME

ForkServer::HTTPServer::Response - the app and its response in a worker of L<ForkServer::HTTPServer>

=head1 DESCRIPTION

The methods of the server object that call the app (arrays, delayed
responses, writers: L<ForkServer::HTTPServer::Writer>), write the response
under C<response_timeout> (an array body with its headers in one
C<write(2)>; a handle's body or a writer's pieces chunked when HTTP/1.1 and
no length is given), run C<psgix.cleanup> handlers, arm and disarm
harakiri, write the access log line, and answer refused requests
(C<_error_response>, always C<Connection: close>).

=cut
