package Plack::Handler::ForkServer;
use strict;
use warnings;
use ForkServer::HTTPServer;

# Options plackup / Plack::Loader may hand us, mapped to the server's.
my %PASS = map { $_ => 1 } qw(
    host port workers max_requests harakiri name heartbeat idle proctitle mercy
    max_header_size max_body_size body_buffer_size read_timeout keepalive_timeout
    socket_timeout header_timeout body_timeout response_timeout stop_grace
    listen_sock server_ready protocol
);

sub new {
    my ($class, %args) = @_;
    return bless {%args}, $class;
}

sub run {
    my ($self, $app) = @_;
    my %opt = map { $_ => $self->{$_} } grep { $PASS{$_} && defined $self->{$_} } keys %$self;

    # plackup --listen HOST:PORT (first one only: one socket per vassal)
    if (!$opt{listen_sock} && ref $self->{listen} eq 'ARRAY' && @{ $self->{listen} }) {
        my $l = $self->{listen}[0];
        if ($l =~ /^\[?(.*?)\]?:(\d+)$/) {
            $opt{host} = $1 if length $1;
            $opt{port} = $2;
        } else {
            die "ForkServer: --listen $l: only HOST:PORT is supported\n";
        }
    }
    $opt{workers} //= $self->{processes};
    $opt{max_requests} //= $self->{'max-requests'};
    $opt{listen_backlog} = $self->{backlog} if $self->{backlog};
    $opt{name} //= 'plack';
    # plackup adds its own AccessLog middleware in development: no second log.
    $opt{access_log} = exists $self->{access_log} ? $self->{access_log} : undef;

    # A port in use is one line and exit status 1, as for the vassal program
    # (left to Perl, die would exit with errno: 98 for EADDRINUSE).
    my $server = ForkServer::HTTPServer->new(%opt, app => $app);
    return $server->run if $server->{listen_sock};
    my $ok = eval { $server->run; 1 };
    return if $ok;
    die $@ unless $@ =~ /: cannot listen on /;
    print STDERR $@;
    exit 1;
}

1;

__END__

=head1 NAME

Plack::Handler::ForkServer - run a PSGI app with psgi-forkserver's HTTP server

=head1 SYNOPSIS

    plackup -s ForkServer --port 5000 --workers 4 app.psgi

    my $server = Plack::Loader->load('ForkServer', host => '127.0.0.1', port => 5000, workers => 2);
    $server->run($app);

=head1 DESCRIPTION

A Plack handler for L<ForkServer::HTTPServer>. Options: C<host>, C<port>
(or C<listen> as C<HOST:PORT>), C<workers>, C<max_requests>, C<harakiri>,
C<name>, C<proctitle>, C<mercy>, C<max_header_size>, C<max_body_size>,
C<body_buffer_size>, C<socket_timeout> (alias C<read_timeout>), C<header_timeout>,
C<body_timeout>, C<response_timeout>, C<keepalive_timeout>, C<stop_grace>, C<access_log>
(a file handle; default none, since plackup logs through its middleware),
C<server_ready>. C<run($app)> returns when the server stops (SIGTERM:
graceful, SIGINT/SIGQUIT: at once, SIGHUP: reload the workers).

=cut
