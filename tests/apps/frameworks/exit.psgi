# What an app leaves for its exit: a buffered log file, an END block, an
# object (Moose, with DEMOLISH) that only the app holds. Each writes to
# EXIT_DIR/events with one write(2), naming its pid.
use strict;
use warnings;
use Fcntl qw(O_WRONLY O_APPEND O_CREAT);

my $exit_event = sub {
    my ($what) = @_;
    my $dir = $ENV{EXIT_DIR} or return;
    sysopen my $fh, "$dir/events", O_WRONLY | O_APPEND | O_CREAT or die "$dir/events: $!";
    syswrite $fh, "$what $$\n";
};

{
    package ExitProbe;
    use Moose;
    sub DEMOLISH { $exit_event->('DEMOLISH') }
    __PACKAGE__->meta->make_immutable;
}

my $probe = ExitProbe->new;
my $log;
END { $exit_event->('END') if $ENV{EXIT_DIR} }

sub {
    my ($env) = @_;
    if ($env->{PATH_INFO} eq '/sleep') { sleep 30 }
    $probe or die;
    # opened at the first request, in the process that serves: buffered
    open $log, '>>', "$ENV{EXIT_DIR}/app.log" or die $! unless $log;
    print $log "request $$ $env->{PATH_INFO}\n";
    return [200, ['Content-Type' => 'text/plain'], ["logged $$\n"]];
};
