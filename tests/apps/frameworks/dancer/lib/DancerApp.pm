package DancerApp;
use strict;
use warnings;
use Dancer2;
use Digest::MD5 ();
use File::Basename ();
use File::Spec ();

my $dir = $ENV{FRAMEWORKS_STATE} // '/tmp';
set appdir  => File::Spec->rel2abs(File::Basename::dirname(__FILE__) . '/..');
set views   => File::Spec->rel2abs(File::Basename::dirname(__FILE__) . '/../views');
set layout  => 'main';
set engines => {
    template => { template_toolkit => { start_tag => '[%', end_tag => '%]' } },
    session  => { YAML => { session_dir => "$dir/dancer-sessions", cookie_name => 'dancer_session' } },
};
set template => 'template_toolkit';
set session => 'YAML';
set charset => 'UTF-8';
set show_errors => 0;

hook before => sub { var greeted => "Dancer\x{e9}" };
hook after  => sub { response_header 'X-Hook' => 'after' };

get '/' => sub { template 'index' => { who => var('greeted'), items => [1 .. 3] } };

get '/json' => sub {
    content_type 'application/json';
    return encode_json({ framework => 'dancer2', greeting => "h\x{e9}llo", items => [1, 2, 3] });
};

post '/upload' => sub {
    my $up = upload('file') or do { status 400; return "no file\n" };
    my $data = $up->content;
    content_type 'text/plain';
    return sprintf "%s %d %s\n", $up->filename, length $data, Digest::MD5::md5_hex($data);
};

get '/stream' => sub {
    delayed {
        content_type 'text/plain';
        flush;
        content "chunk $_\n" for 1 .. 3;
        done;
    };
};

get '/session' => sub {
    my $n = (session('count') // 0) + 1;
    session count => $n;
    content_type 'text/plain';
    return "count $n\n";
};

get '/redirect' => sub { redirect '/json' };

get '/die' => sub { die "the route died\n" };

1;
