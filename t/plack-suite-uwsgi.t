use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);
use POSIX ();
use Test::TCP qw(empty_port wait_port);
use Plack::Test::Suite;

# Plack's server conformance suite over the uwsgi protocol (`socket = ADDR`):
# a real nginx with uwsgi_pass in front of Plack::Handler::ForkServer in
# uwsgi mode; the suite's HTTP requests go to nginx.
my ($nginx) = grep { -x } '/usr/sbin/nginx', '/usr/local/sbin/nginx';
plan skip_all => 'nginx is not installed (make setup)' unless $nginx;

my $dir = tempdir(CLEANUP => 1);
chmod 0755, $dir;    # nginx workers (nobody, under a root master) write their temporary files here
my ($server_port, $http_port) = (empty_port(), empty_port());
$http_port = empty_port() while $http_port == $server_port;
my @params = (
    QUERY_STRING => '$query_string', REQUEST_METHOD => '$request_method',
    CONTENT_TYPE => '$content_type', CONTENT_LENGTH => '$content_length',
    REQUEST_URI => '$request_uri',
    SERVER_PROTOCOL => '$server_protocol', REQUEST_SCHEME => '$scheme',
    REMOTE_ADDR => '$remote_addr', REMOTE_PORT => '$remote_port',
    SERVER_PORT => '$server_port', SERVER_NAME => '$host',
);
my $params = '';
while (my ($k, $v) = splice @params, 0, 2) { $params .= "            uwsgi_param $k $v;\n" }
open my $fh, '>', "$dir/nginx.conf" or die "$dir/nginx.conf: $!";
print $fh <<"CONF";
daemon off;
master_process on;
worker_processes 1;
pid $dir/nginx.pid;
error_log stderr error;
events { worker_connections 256; }
http {
    access_log off;
    client_max_body_size 0;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    server {
        listen 127.0.0.1:$http_port;
        location / {
$params            uwsgi_pass 127.0.0.1:$server_port;
        }
    }
}
CONF
close $fh;
my $pid = fork // die "fork: $!";
if (!$pid) {
    POSIX::setsid();
    { exec $nginx, '-e', 'stderr', '-p', $dir, '-c', "$dir/nginx.conf" }
    POSIX::_exit(127);
}
wait_port({ port => $http_port, max_wait => 30 });

Plack::Test::Suite->run_server_tests('ForkServer', $server_port, $http_port,
    workers => 2, protocol => 'uwsgi');

kill 'TERM', $pid;
waitpid $pid, 0;
done_testing;
