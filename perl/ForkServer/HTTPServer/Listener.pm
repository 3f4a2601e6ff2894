package ForkServer::HTTPServer::Listener;
use strict;
use warnings;

# The server's listening socket: the one it was given, or one it binds;
# and the SERVER_NAME and SERVER_PORT every request reports.

use Socket qw(SOL_SOCKET SO_REUSEADDR AF_INET AF_INET6 AF_UNIX AF_UNSPEC SOCK_STREAM AI_PASSIVE
              getaddrinfo inet_ntop unpack_sockaddr_in unpack_sockaddr_in6 sockaddr_family);

sub setup {
    my $self = shift;
    _listen($self) unless $self->{listen_sock};
    # SERVER_NAME / SERVER_PORT are per listener: compute them once.
    my $name = getsockname($self->{listen_sock}) or die "getsockname: $!";
    my ($port, $addr);
    if (sockaddr_family($name) == AF_UNIX) {
        # behind a front door: the Host header names the site, not the socket
        ($port, $addr) = (0, 'localhost');
    } elsif (sockaddr_family($name) == AF_INET6) {
        ($port, $addr) = unpack_sockaddr_in6($name);
        $addr = inet_ntop(AF_INET6, $addr);
    } else {
        ($port, $addr) = unpack_sockaddr_in($name);
        $addr = inet_ntop(AF_INET, $addr);
    }
    $self->{server_name} = $self->{host} && $self->{host} ne '*' ? $self->{host} : $addr;
    $self->{server_port} = $port;
    $self->{port} //= $port;
}

# plain socket/bind/listen: IO::Socket::IP would cost ~15 ms to load
sub _listen {
    my $self = shift;
    my $host = $self->{host} // '0.0.0.0';
    $host = '0.0.0.0' if $host eq '*' || $host eq '';
    $host =~ s/^\[(.*)\]$/$1/;
    my $port = $self->{port} // 5000;
    my $where = "$self->{name}: cannot listen on $host:$port";
    my ($err, @ai) = getaddrinfo($host, $port, { socktype => SOCK_STREAM, flags => AI_PASSIVE, family => AF_UNSPEC });
    die "$where: $err\n" if $err || !@ai;
    my $ai = $ai[0];
    socket(my $sock, $ai->{family}, SOCK_STREAM, 0) or die "$where: socket: $!\n";
    setsockopt($sock, SOL_SOCKET, SO_REUSEADDR, 1) or die "$where: setsockopt: $!\n";
    bind($sock, $ai->{addr}) or die "$where: $!\n";
    listen($sock, $self->{listen_backlog}) or die "$where: listen: $!\n";
    $self->{listen_sock} = $sock;
    $self->{own_listener} = 1;
}

1;

__END__

=head1 NAME

ForkServer::HTTPServer::Listener - the listening socket of L<ForkServer::HTTPServer>

=head1 FUNCTIONS

=head2 setup($server)

Binds and listens on C<host>:C<port> (backlog C<listen_backlog>) unless the
server was given C<listen_sock>; sets C<server_name> and C<server_port>.
Dies with one line naming the vassal and the address when it cannot.

=cut
