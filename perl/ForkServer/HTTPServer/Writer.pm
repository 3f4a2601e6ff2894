package ForkServer::HTTPServer::Writer;
use strict;
use warnings;

use ForkServer::HTTPServer::Wire ();

# The writer handed to a streaming PSGI app (psgi.streaming): the headers
# are out, write() sends body pieces (chunked when the app gave no length),
# close() ends the body.

sub _new {
    my ($class, $conn, $st, $chunked, $send_body) = @_;
    return bless { conn => $conn, st => $st, chunked => $chunked, send => $send_body, closed => 0 }, $class;
}

sub write {
    my ($self, $data) = @_;
    die "ForkServer: write() after close()\n" if $self->{closed};
    return unless $self->{send} && defined $data && length $data;
    # the app's own chunk framing, for an HTTP/1.0 client (Dechunk)
    $data = $self->{st}{dechunk}->feed($data) if $self->{st}{dechunk};
    return unless length $data;
    $self->{st}{bytes} += length $data;
    local $ForkServer::HTTPServer::Wire::DEADLINE = $self->{st}{deadline} // 0;
    ForkServer::HTTPServer::Wire::write_all($self->{conn},
        $self->{chunked} ? sprintf('%x', length $data) . "\015\012" . $data . "\015\012" : $data);
    return;
}

sub close {
    my $self = shift;
    return if $self->{closed}++;
    local $ForkServer::HTTPServer::Wire::DEADLINE = $self->{st}{deadline} // 0;
    ForkServer::HTTPServer::Wire::write_all($self->{conn}, "0\015\012\015\012") if $self->{chunked};
    return;
}

# A blocking server: the writer is always ready.
sub poll_cb {
    my ($self, $cb) = @_;
    $cb->($self) until $self->{closed};
    return;
}

1;

__END__

=head1 NAME

ForkServer::HTTPServer::Writer - the writer object of a streaming PSGI response

=head1 METHODS

C<write($bytes)>, C<close()>, C<poll_cb($cb)> as the PSGI specification
describes them.

=cut
